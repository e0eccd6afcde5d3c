"""Where things live during a run: the model on the CPU, one decoder layer at a time on `--device`.

`place` is the one function that moves a decoder layer (or the parts around the stack) between the
CPU and the compute device, so a run's placement can be observed in one spot. `to_device` moves the
tensors a layer works on (nested in tuples, lists and dicts).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

CPU = torch.device("cpu")


def off_cpu(device) -> bool:
    """Whether `device` asks for the device path: anything but plain "cpu" ("cpu:0" takes it on the CPU)."""
    return torch.device(device) != CPU


def place(module: nn.Module, device) -> nn.Module:
    """Move `module` to `device`, in place."""
    return module.to(device)


@contextmanager
def on_device(module: nn.Module, device):
    """`module` on `device` for the block, back on the CPU after."""
    place(module, device)
    try:
        yield module
    finally:
        place(module, CPU)


def to_device(obj, device):
    """`obj` with every tensor in it (through tuples, lists and dicts) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
