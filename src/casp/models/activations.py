"""Hidden states caught between decoder layers, kept in fp16 and spilled to disk above a cap.

A streamed compression holds one layer's inputs (and builds the next layer's) for every
calibration batch. `SpillingActivations` stores them in fp16 (half of fp32's bytes, and the
same values on every run, which `--resume` needs) and writes batches to safetensors files in
`spill_dir` once the bytes held in memory would pass `max_bytes`. Reading returns float32.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

_ids = itertools.count()


class SpillingActivations(Sequence):
    """A list of activation tensors (one per calibration batch), fp16 in memory or on disk."""

    def __init__(self, tensors: Iterable[torch.Tensor] = (), *, max_bytes: int | None = None,
                 spill_dir: str | Path | None = None):
        self.max_bytes = max_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._items: list[torch.Tensor | Path] = []
        self.bytes_in_memory = 0
        self._tag = f"{next(_ids):06d}"
        for t in tensors:
            self.append(t)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", torch.float16).contiguous()
        size = t.numel() * t.element_size()
        if self.max_bytes is not None and self.spill_dir is not None and self.bytes_in_memory + size > self.max_bytes:
            from safetensors.torch import save_file

            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"act-{self._tag}-{len(self._items):05d}.safetensors"
            save_file({"h": t}, str(path))
            self._items.append(path)
        else:
            self._items.append(t)
            self.bytes_in_memory += size

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        if isinstance(item, Path):
            from safetensors.torch import load_file

            item = load_file(str(item))["h"]
        return item.float()

    @property
    def spilled(self) -> int:
        """How many batches live on disk."""
        return sum(isinstance(x, Path) for x in self._items)

    def fp16(self) -> list[torch.Tensor]:
        """The stored fp16 tensors (read back from disk where spilled)."""
        return [self[i].half() for i in range(len(self))]

    def drop(self) -> None:
        """Delete the spill files and forget the tensors."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items, self.bytes_in_memory = [], 0
