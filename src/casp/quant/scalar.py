"""The scalar-grid format shared by RTN and GPTQ: uniform b-bit codes with per-group scale and zero.

A weight row is cut into groups of `group_size` input columns (-1: the whole row; a size that does
not divide in_features leaves a shorter last group). Each (row, group) has a grid
value = (code - zero) · scale with code in [0, 2^b - 1]:

- asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto the codes; zero is an integer code
  (the range includes 0, so the zero point is always a valid code) and is stored.
- symmetric: scale = 2·absmax / (2^b - 1) and zero = (2^b - 1) / 2, the implicit half-integer
  midpoint, so the 2^b levels sit symmetrically on [-absmax, absmax]; nothing is stored for it.

Scales are stored in fp16, and the codes are always computed from the fp16-rounded scale, so
dequantizing the stored tensors reproduces the quantizer's output bit for bit.

Stored tensors (`QuantizedWeight.tensors`):
    codes  int32 (out, packed words of in)       codes packed along the input dim
    scales fp16  (out, groups)
    zeros  int32 (groups, packed words of out)   asymmetric only; packed along the output dim
meta: format="scalar", bits, group_size, sym, out_features, in_features (+ method, informational).
"""
from __future__ import annotations

import math

import torch

from dataclasses import dataclass, field

from casp.quant.base import QuantizedWeight, StorageFormat
from casp.quant.kernel_registry import declare_kernels
from casp.quant.packing import pack_codes, packed_bits, packed_words, unpack_codes

FORMAT = "scalar"
SCALAR_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """One scalar-grid setting: bit-width, group size along the input dim (-1: whole row), symmetry."""

    bits: int
    group_size: int = 128
    sym: bool = False

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.bits}b-{g}{'-sym' if self.sym else ''}"

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}


@dataclass(frozen=True)
class ScalarOptions:
    """Options of every scalar-grid quantizer: the grid, and the candidate ladder for allocation."""

    sym: bool = field(default=False, metadata={"flag": "--sym", "help": "symmetric quantization grid"})
    group_size: int = field(default=128, metadata={
        "flag": "--group-size", "type": int, "help": "group size of a uniform run (-1: per output channel)"})
    candidate_bits: tuple[int, ...] = field(default=(2, 3, 4, 8), metadata={
        "flag": "--candidate-bits", "type": "ints", "help": "bit-widths the allocator may choose (default 2,3,4,8)"})
    candidate_group_sizes: tuple[int, ...] = field(default=(32, 64, 128, -1), metadata={
        "flag": "--candidate-group-sizes", "type": "ints",
        "help": "group sizes the allocator may choose (default 32,64,128,-1; -1 = per channel)"})

    def __post_init__(self):
        for b in self.candidate_bits:
            if b not in SCALAR_BITS:
                raise ValueError(f"bit-widths must be among 2, 3, 4, 8; got {b}")
        for g in (self.group_size, *self.candidate_group_sizes):
            if g == 0 or g < -1:
                raise ValueError(f"group sizes must be positive or -1 (per channel), got {g}")

    def candidates(self) -> list[QuantSpec]:
        """The ladder: every candidate bit-width with every candidate group size."""
        groups = list(dict.fromkeys(self.candidate_group_sizes))
        return [QuantSpec(b, g, self.sym) for b in sorted(set(self.candidate_bits)) for g in groups]

    def uniform_setting(self, bits: float) -> QuantSpec:
        return QuantSpec(int(bits), self.group_size, self.sym)
_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal); keeps scales non-zero


def reproduces(spec: QuantSpec, grid: tuple[int, int] | None) -> bool:
    """Whether an asymmetric min/max grid of `spec` can land exactly on weights stored on `grid`.

    Weights dequantized from a b-bit grid with groups of G (e.g. GGUF Q4_1: 4 bits, G = 32) are
    reproduced by the same bit-width on any group inside one of the source groups: such a setting
    measures almost no error and would be chosen for that reason alone.
    """
    if grid is None or spec.sym or spec.group_size == -1:
        return False
    bits, group = grid
    return spec.bits == bits and spec.group_size <= group and group % spec.group_size == 0


def num_groups(in_features: int, group_size: int) -> int:
    """Number of column groups per row; the last one may be shorter."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """Columns per group (the whole row for -1)."""
    return in_features if group_size == -1 else group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the min/max (or absmax) grid, reducing the last dim of `w`.

    Zero padding of `w` along the last dim does not change the result (the range always
    includes 0). Returns float32 tensors; the scale is already rounded to fp16.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    if sym:
        absmax = w.abs().amax(dim=-1)
        scale = 2.0 * absmax / maxq
    else:
        xmin = w.amin(dim=-1).clamp(max=0.0)
        xmax = w.amax(dim=-1).clamp(min=0.0)
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(_FP16_TINY, _FP16_MAX).half().float()
    if sym:
        zero = torch.full_like(scale, maxq / 2.0)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid code for each weight (broadcasting scale/zero): int32 in [0, 2^b - 1]."""
    maxq = (1 << bits) - 1
    return torch.round(w.float() / scale + zero).clamp(0, maxq).to(torch.int32)


def dequantize_grid(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(code - zero) · scale in float32; the one formula used by quantizers and loaders alike."""
    return (codes.float() - zero) * scale


def rtn_codes(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes with per-group min/max grid: (codes (out, in), scale, zero (out, groups))."""
    rows, cols = weight.shape
    g = effective_group_size(cols, spec.group_size)
    ng = num_groups(cols, spec.group_size)
    w = weight.float()
    pad = ng * g - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.view(rows, ng, g)
    scale, zero = grid_params(w, spec.bits, spec.sym)
    codes = quantize_to_grid(w, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits)
    return codes.view(rows, ng * g)[:, :cols], scale, zero


def to_quantized_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, method: str
) -> QuantizedWeight:
    """Pack codes (out, in), scales and zeros (out, groups) into the stored scalar format."""
    out_features, in_features = codes.shape
    tensors = {
        "codes": pack_codes(codes, spec.bits),
        "scales": scale.to(torch.float16).contiguous(),
    }
    if not spec.sym:
        tensors["zeros"] = pack_codes(zero.to(torch.int32).t().contiguous(), spec.bits)
    meta = {
        "format": FORMAT,
        "method": method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "out_features": out_features,
        "in_features": in_features,
    }
    return QuantizedWeight(tensors=tensors, meta=meta)


def scalar_row_reader(qw: QuantizedWeight):
    """read(start, end) -> float32 weight rows [start, end) of the stored scalar format.

    Scales and zeros are unpacked once; each call unpacks only its rows of codes. Works on the
    tensors' device.
    """
    m = qw.meta
    bits, gs = m["bits"], m["group_size"]
    out_features, in_features = m["out_features"], m["in_features"]
    ng = num_groups(in_features, gs)
    g = effective_group_size(in_features, gs)
    pad = ng * g - in_features
    scale = qw.tensors["scales"].float()
    if m["sym"]:
        zero = torch.full_like(scale, ((1 << bits) - 1) / 2.0)
    else:
        zero = unpack_codes(qw.tensors["zeros"], bits, out_features).t().float()
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    packed = qw.tensors["codes"]

    def read(start: int, end: int) -> torch.Tensor:
        codes = unpack_codes(packed[start:end], bits, in_features, dtype=torch.uint8)
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        rows = codes.shape[0]
        # (code - zero) · scale, the arithmetic of dequantize_grid (uint8 - float32 → float32)
        w = torch.sub(codes.view(rows, ng, g), zero[start:end])
        w.mul_(scale[start:end])
        w = w.view(rows, ng * g)
        return w[:, :in_features].contiguous() if pad else w

    return read


def dequantize_scalar(qw: QuantizedWeight) -> torch.Tensor:
    """Rebuild the float32 weight from the stored scalar format, on the tensors' device."""
    return scalar_row_reader(qw)(0, qw.meta["out_features"])


def empty_scalar_tensors(meta: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the stored shapes/dtypes, e.g. to load a state dict into."""
    bits, gs = meta["bits"], meta["group_size"]
    out_features, in_features = meta["out_features"], meta["in_features"]
    ng = num_groups(in_features, gs)
    tensors = {
        "codes": torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32),
        "scales": torch.zeros(out_features, ng, dtype=torch.float16),
    }
    if not meta["sym"]:
        tensors["zeros"] = torch.zeros(ng, packed_words(out_features, bits), dtype=torch.int32)
    return tensors


def scalar_stored_bits(spec: QuantSpec, out_features: int, in_features: int) -> int:
    """Exact stored bits of the scalar format for a shape: packed codes (out, in) at `bits`, fp16
    scales (out, groups) and, asymmetric only, packed zeros (groups, out) at `bits`."""
    groups = num_groups(in_features, spec.group_size)
    total = packed_bits(out_features, in_features, spec.bits)
    total += out_features * groups * 16
    if not spec.sym:
        total += packed_bits(groups, out_features, spec.bits)
    return total


SCALAR_FORMAT = StorageFormat(FORMAT, dequantize_scalar, empty_scalar_tensors, scalar_stored_bits, scalar_row_reader,
                              tunable=("scales",))
declare_kernels(FORMAT, cpu="casp.nn.cpu_kernels:scalar_cpu_matmul")
