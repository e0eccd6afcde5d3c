"""Watches where decoder layers are while a run works, without a GPU.

`DeviceSpy` wraps `casp.models.placement.place` (the one function that moves a layer) and adds a
forward hook to every decoder layer. It records a problem when a layer runs while not moved to the
configured device, when a second layer is moved there while one already is, when a layer is asked
for another device, or when the quantizer runs while no single layer is on the device. Run with a
device like "cpu:0", which takes every device code path while computing on the CPU.
"""
from __future__ import annotations

import torch

from casp.models import placement


class DeviceSpy:
    def __init__(self, monkeypatch, device):
        self.device = torch.device(device)
        self.index: dict[int, int] = {}
        self.on: set[int] = set()
        self.visits: list[int] = []
        self.problems: list[str] = []
        self.quantize_calls = 0
        real = placement.place

        def place(module, to):
            self._moved(module, torch.device(to))
            return real(module, to)

        monkeypatch.setattr(placement, "place", place)

    def watch(self, layers) -> None:
        """Follow these decoder layers (index in the list = layer index)."""
        for i, layer in enumerate(layers):
            self.index[id(layer)] = i
            layer.register_forward_hook(self._ran)

    def watch_quantizer(self, monkeypatch, cls) -> None:
        """Check that every `cls.quantize` call happens while exactly one layer is on the device."""
        real = cls.quantize

        def quantize(quantizer, *args, **kwargs):
            self.quantize_calls += 1
            if len(self.on) != 1:
                self.problems.append(f"quantizer ran with layers {sorted(self.on)} on the device")
            return real(quantizer, *args, **kwargs)

        monkeypatch.setattr(cls, "quantize", quantize)

    def _moved(self, module, to: torch.device) -> None:
        i = self.index.get(id(module))
        if i is None:
            return
        if to == self.device:
            if self.on - {i}:
                self.problems.append(f"layer {i} moved to the device while {sorted(self.on)} were there")
            if i not in self.on:
                self.visits.append(i)
            self.on.add(i)
        elif to == placement.CPU:
            if i not in self.on:
                self.problems.append(f"layer {i} was walked on the CPU")
            self.on.discard(i)
        else:
            self.problems.append(f"layer {i} asked for {to}")

    def _ran(self, layer, _args, _out) -> None:
        i = self.index[id(layer)]
        if self.on != {i}:
            self.problems.append(f"layer {i} ran with layers {sorted(self.on)} on the device")
