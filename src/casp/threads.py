"""How many CPU threads the heavy kernels use: every core the process may run on, unless told."""
from __future__ import annotations

import os

from casp.errors import CaspError


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads`, or to `usable_cores()` when None; return the number set.

    torch's own default counts physical cores, which leaves hyper-threads (or a 2-vCPU machine of one
    core) half idle.
    """
    if threads is not None and threads < 1:
        raise CaspError(f"--threads must be at least 1, got {threads}")
    import torch

    n = threads if threads is not None else usable_cores()
    torch.set_num_threads(n)
    return n
