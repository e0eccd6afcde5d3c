"""The quantizer plug-in interface: a quantizer, its settings, its stored format, and two registries.

A quantizer is one module. It declares
- `Config`: a dataclass of its own options (GPTQ's damping stays GPTQ's), built from
  `CompressionConfig.quantizer_options`; fields with `metadata={"flag": ...}` become CLI flags;
- `candidates()`: the settings the allocator may choose from, and `uniform_setting(bits)`;
- `format`: the `StorageFormat` it writes, which owns the exact stored bits of a setting for a
  shape (the allocator's cost), the empty tensors used for loading and dequantization; its fused
  matmul kernels, if any, are declared beside it (`casp.quant.kernel_registry`).
The pipeline, the allocator and the report only talk to these methods; none names a quantizer.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol

import torch


class Setting(Protocol):
    """One candidate setting of a quantizer (a frozen dataclass): a label and its report fields."""

    def label(self) -> str: ...

    def describe(self) -> dict: ...


@dataclass
class QuantizedWeight:
    """What is stored for one quantized matrix: tensors (safetensors-ready) and metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    def dequantize(self) -> torch.Tensor:
        return get_format(self.meta["format"]).dequantize(self)


@dataclass(frozen=True)
class StorageFormat:
    """How one stored layout (`meta["format"]`) is costed, rebuilt and read.

    `stored_bits(setting, out_features, in_features)` must equal `QuantizedWeight.stored_bits()` of
    what the quantizer writes for that setting and shape: it is the allocator's cost.
    `row_reader(qw)` (optional) gives read(start, end) -> float32 rows, so inference can rebuild a
    large weight a slice at a time. `tunable` names the stored tensors that fine-tuning may change with
    the codes fixed (`casp.steps.finetune`). Fused matmul kernels are not part of it: the module defining
    the format declares them in `casp.quant.kernel_registry`.
    """

    name: str
    dequantize: Callable[[QuantizedWeight], torch.Tensor]
    empty_tensors: Callable[[dict], dict[str, torch.Tensor]]
    stored_bits: Callable[[object, int, int], int]
    row_reader: Callable[[QuantizedWeight], Callable[[int, int], torch.Tensor]] | None = None
    tunable: tuple[str, ...] = ()   # continuous stored tensors `dequantize` is differentiable in (fine-tuning)

    def rows(self, qw: QuantizedWeight) -> Callable[[int, int], torch.Tensor]:
        """A function (start, end) -> float32 weight rows [start, end)."""
        if self.row_reader is not None:
            return self.row_reader(qw)
        full = self.dequantize(qw)
        return lambda start, end: full[start:end]


@dataclass(frozen=True)
class NoOptions:
    """The options of a plug-in that has none."""


class Configurable:
    """A plug-in with its own options dataclass `Config`: built from it, a dict, or keyword overrides."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions

    def __init__(self, config=None, **options):
        config = config if config is not None else self.Config()
        self.config = dataclasses.replace(config, **options) if options else config

    @classmethod
    def from_options(cls, options: dict):
        """Build from a plain dict of option names (unknown names raise ValueError)."""
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{cls.name!r} has no option {', '.join(unknown)}"
                             f" (its options: {', '.join(sorted(known)) or 'none'})")
        return cls(cls.Config(**options))


def matmul_by_slabs(x: torch.Tensor, read_rows, out_features: int, slab_elements: int) -> torch.Tensor:
    """x (tokens, in) times a stored weight rebuilt a slab of output rows at a time (read_rows(start, end)).

    The dense weight never exists whole: each slab holds about `slab_elements` weights.
    """
    y = x.new_empty(x.shape[0], out_features)
    step = max(1, slab_elements // max(1, x.shape[1]))
    for start in range(0, out_features, step):
        end = min(start + step, out_features)
        y[:, start:end] = torch.nn.functional.linear(x, read_rows(start, end).to(x.dtype))
    return y


class Quantizer(Configurable, ABC):
    """Base class. `quantize` returns the stored form and the dequantized float32 weight."""

    format: ClassVar[StorageFormat]
    in_features_multiple: ClassVar[int] = 1   # input sizes it can store (vector quantizers: the vector length)
    # each output row is quantized on its own given XᵀX and `row_context` of the whole matrix, so a damage
    # is a sum over rows and a row sample estimates it
    rows_independent: ClassVar[bool] = False

    @property
    def ratio_rows(self) -> int:
        """Where a matrix's probe setting is coded whole (`casp.steps.measure`), the rows of the sample that measures
        every setting as a ratio to the probe's damage on those rows (0: `MEASURE_ROWS` rows, scaled directly)."""
        return 0

    @classmethod
    def target_options(cls, bits: float) -> dict:
        """Defaults that depend on the target average bits (the user's options override them)."""
        return {}

    @classmethod
    def stand_in_text_options(cls) -> dict:
        """Defaults of the `stand-in-text` preset, asked for by runs calibrated on a text from another domain
        than the model's use (the user's options override them)."""
        return {}

    @classmethod
    def transform_options(cls, transform: str | None) -> dict:
        """Defaults that hold under a weight transform (`--transform`, None: none); the user's options override
        them."""
        return {}

    @classmethod
    def sensitivity_tokens(cls, transform: str | None) -> tuple[int, str] | None:
        """Calibration tokens of the sensitivity pass where this quantizer needs fewer than the default
        (`casp.config.FISHER_TOKENS`), and why; None: the default."""
        return None

    def reproduces_grid(self, setting, grid: tuple[int, int]) -> bool:
        """Whether `setting` lands exactly on weights already stored on `grid` = (bits, group size), so that
        its measured damage would be near zero for that reason alone (such candidates are left out)."""
        return False

    @abstractmethod
    def candidates(self) -> list:
        """The settings the allocator may choose from (from this quantizer's config)."""

    @abstractmethod
    def uniform_setting(self, bits: float):
        """The one setting used everywhere for a uniform run at `bits`."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, xtx: torch.Tensor | None, setting) -> tuple[QuantizedWeight, torch.Tensor]:
        ...

    def row_context(self, weight: torch.Tensor, xtx: torch.Tensor | None) -> dict:
        """What coding a sample of `weight`'s rows (input second moment `xtx`) needs from the whole matrix (E8:
        its RMS), so that each sampled row is coded as it is in the whole; {} when rows need nothing of each other."""
        return {}

    def dequantize_many(self, weight: torch.Tensor, xtx: torch.Tensor | None, settings,
                        context: dict | None = None) -> list[torch.Tensor]:
        """The dequantized float32 weight at each setting: what measuring candidates needs. `context` is
        `row_context` of the whole matrix when `weight` is a row sample of it.

        A quantizer overrides it when the settings can share work (GPTQ: one Cholesky, one sweep; E8: one
        BlockLDLQ sweep for every setting and scale).
        """
        return [self.quantize(weight, xtx, s)[1] for s in settings]

    def sweep(self, weight: torch.Tensor, xtx: torch.Tensor | None, settings,
              context: dict | None = None) -> list[tuple[torch.Tensor, dict | None]]:
        """`dequantize_many`, each weight with a hint for `quantize_hinted`: what the sweep chose for that setting
        (JSON data; None: nothing to pass on)."""
        return [(d, None) for d in self.dequantize_many(weight, xtx, settings, context)]

    def quantize_hinted(self, weight: torch.Tensor, xtx: torch.Tensor | None, setting,
                        hint: dict | None) -> tuple[QuantizedWeight, torch.Tensor]:
        """`quantize`, given the hint a `sweep` of this matrix (or of a row sample of it) gave for `setting`, so that
        a choice made there is not made again. By default the hint is not needed."""
        return self.quantize(weight, xtx, setting)

    def stored_bits(self, setting, out_features: int, in_features: int) -> int:
        """Exact stored bits of `setting` for a matrix of this shape."""
        return self.format.stored_bits(setting, out_features, in_features)


_REGISTRY: dict[str, type[Quantizer]] = {}
_FORMATS: dict[str, StorageFormat] = {}


def register_format(fmt: StorageFormat) -> StorageFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make a quantizer (and its format) known by name."""
    _REGISTRY[cls.name] = cls
    register_format(cls.format)
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


def get_format(name: str) -> StorageFormat:
    """The reader of a stored layout."""
    if name not in _FORMATS:
        _load_builtins()
    if name not in _FORMATS:
        raise KeyError(f"unknown storage format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def quant_loss(weight: torch.Tensor, qweight: torch.Tensor, xtx: torch.Tensor) -> float:
    """GPTQ's objective tr((W-Q) H (W-Q)ᵀ) with H = XᵀX, in float64."""
    d = (weight.double() - qweight.double())
    return float(torch.einsum("oi,ij,oj->", d, xtx.double(), d))
