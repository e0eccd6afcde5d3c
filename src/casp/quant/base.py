"""The quantizer plug-in interface: one small protocol, one registry.

A quantizer turns a weight W (out x in) and the calibration second moment XᵀX of its
input into a `QuantizedWeight`: the exact tensors that will be stored, plus JSON-able
metadata from which the weight can be rebuilt. A new method is one new file that
subclasses `Quantizer` and decorates itself with `@register`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

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
        return get_format(self.meta["format"]).dequantize(self)


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

    @staticmethod
    def empty_tensors(meta: dict) -> dict[str, torch.Tensor]:
        """Tensors of the stored shapes for `meta` (to load a state dict into); optional."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Quantizer]] = {}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    """Import the built-in quantizers so that they register themselves."""
    import casp.quant  # noqa: F401


def get_quantizer_class(name: str) -> type[Quantizer]:
    if name not in _REGISTRY:
        _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown quantizer {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_quantizers() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class StorageFormat:
    """How to read one stored layout (`meta["format"]`), shared by the quantizers that write it."""

    name: str
    dequantize: Callable[[QuantizedWeight], torch.Tensor]
    empty_tensors: Callable[[dict], dict[str, torch.Tensor]]
    # Optional: qw -> read(start, end) giving float32 rows [start, end) of the weight, so that
    # inference can rebuild a large weight a slice at a time. Without it, dequantize() is sliced.
    row_reader: Callable[[QuantizedWeight], Callable[[int, int], torch.Tensor]] | None = None

    def rows(self, qw: QuantizedWeight) -> Callable[[int, int], torch.Tensor]:
        """A function (start, end) -> float32 weight rows [start, end)."""
        if self.row_reader is not None:
            return self.row_reader(qw)
        full = self.dequantize(qw)
        return lambda start, end: full[start:end]


_FORMATS: dict[str, StorageFormat] = {}


def register_format(fmt: StorageFormat) -> StorageFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> StorageFormat:
    """The reader for a stored layout; a quantizer's own name also works as its format."""
    if name not in _FORMATS and name not in _REGISTRY:
        _load_builtins()
    if name in _FORMATS:
        return _FORMATS[name]
    if name in _REGISTRY:
        cls = _REGISTRY[name]
        return StorageFormat(name, cls.dequantize, cls.empty_tensors)
    known = sorted(set(_FORMATS) | set(_REGISTRY))
    raise KeyError(f"unknown storage format {name!r}; known: {', '.join(known)}")


def quant_loss(weight: torch.Tensor, qweight: torch.Tensor, xtx: torch.Tensor) -> float:
    """GPTQ's objective tr((W-Q) H (W-Q)ᵀ) with H = XᵀX, in float64."""
    d = (weight.double() - qweight.double())
    return float(torch.einsum("oi,ij,oj->", d, xtx.double(), d))
