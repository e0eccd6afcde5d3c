"""The quantizer plug-in interface: one small protocol, one registry.

A quantizer turns a weight W (out x in) and the calibration second moment XᵀX of its
input into a `QuantizedWeight`: the exact tensors that will be stored, plus JSON-able
metadata from which the weight can be rebuilt. A new method is one new file that
subclasses `Quantizer` and decorates itself with `@register`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass(frozen=True)
class QuantSpec:
    """One candidate setting: bit-width, group size along the input dim (-1: whole row), symmetry."""

    bits: int
    group_size: int = 128
    sym: bool = False

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.bits}b-{g}{'-sym' if self.sym else ''}"


@dataclass
class QuantizedWeight:
    """What is stored for one quantized matrix: tensors (safetensors-ready) and metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    def dequantize(self) -> torch.Tensor:
        return get_quantizer_class(self.meta["format"]).dequantize(self)


class Quantizer(ABC):
    """Base class. `quantize` returns the stored form and the dequantized float32 weight."""

    name: ClassVar[str]

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, xtx: torch.Tensor | None, spec: QuantSpec
    ) -> tuple[QuantizedWeight, torch.Tensor]:
        ...

    @staticmethod
    @abstractmethod
    def dequantize(qw: QuantizedWeight) -> torch.Tensor:
        ...


_REGISTRY: dict[str, type[Quantizer]] = {}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    _REGISTRY[cls.name] = cls
    return cls


def get_quantizer_class(name: str) -> type[Quantizer]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown quantizer {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def quant_loss(weight: torch.Tensor, qweight: torch.Tensor, xtx: torch.Tensor) -> float:
    """GPTQ's objective tr((W-Q) H (W-Q)ᵀ) with H = XᵀX, in float64."""
    d = (weight.double() - qweight.double())
    return float(torch.einsum("oi,ij,oj->", d, xtx.double(), d))
