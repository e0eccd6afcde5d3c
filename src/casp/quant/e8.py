"""`--quantizer e8`: QuIP#-style E8-lattice vector quantization (E8P codebook, BlockLDLQ, residual VQ).

Each run of 8 consecutive input weights of a row is one codeword of E8P (`casp.algorithms.e8p`):
16 bits per 8 weights at 2 bits; 3 bits add an 8-bit code of a 256-point E8 codebook on the scaled
residual, 4 bits a second E8P code. Rounding is BlockLDLQ with blocks of 8 columns on the damped
XᵀX; one scale per stage and matrix is chosen by trying a few multiples of RMS(W) and keeping the
lowest proxy loss tr(ΔHΔᵀ). With `act_order` the columns are visited by decreasing XᵀX diagonal,
which needs the permutation stored; it pays off when no incoherence transform precedes the
quantizer (see docs/e8.md).

Stored tensors of format "e8p" (G = ⌈in_features/8⌉; in_features that are not a multiple of 8 are
padded with zero weights, and the padding is stored and counted):
    codes   int16 (out, G)   stage-1 E8P codes (the 16-bit code as two's complement)
    codes2  int16 (out, G)   4 bits: stage-2 E8P codes
            uint8 (out, G)   3 bits: stage-2 codes of the 256-point E8 codebook
    scales  fp16 (stages,)   W = Σ_k scales[k] · decode_k(codes_k)
    perm    int16 (in,)      act_order only (int32 when in_features > 32768): the stored column j is
                             input perm[j]
meta: format="e8p", method="e8", bits, act_order, out_features, in_features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from casp.algorithms.e8p import CODE_DIM, e8_1bit_decode, e8p_decode, quantize_matrix, stage_count
from casp.quant.base import QuantizedWeight, Quantizer, StorageFormat, matmul_by_slabs, register

FORMAT = "e8p"
E8_BITS = (2, 3, 4)
_INT16_MAX_INDEX = 1 << 15
_CPU_SLAB_ELEMENTS = 1 << 20


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated floats, for tuple-valued flags."""
    import argparse

    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True)
class E8Setting:
    """One E8 setting: 2 (E8P), 3 (E8P + 1-bit E8) or 4 (E8P + E8P) bits per weight; column order."""

    bits: int
    act_order: bool = False

    def label(self) -> str:
        return f"e8p-{self.bits}b{'-ao' if self.act_order else ''}"

    def describe(self) -> dict:
        return {"bits": self.bits, "act_order": self.act_order}


@dataclass(frozen=True)
class E8Options:
    """Options of the E8 quantizer (`candidate_bits` shares its --candidate-bits flag with the scalar ones)."""

    ldlq_damp: float = field(default=0.01, metadata={
        "flag": "--e8-damp", "type": float, "help": "BlockLDLQ damping (fraction of mean diag XᵀX)"})
    scale_multipliers: tuple[float, ...] = field(default=(0.9, 1.0, 1.1, 1.2), metadata={
        "flag": "--e8-scale-grid", "type": _floats,
        "help": "multiples of the nominal scale RMS(W)/rho tried per matrix (default 0.9,1.0,1.1,1.2)"})
    e8p_rho: float = field(default=1.03, metadata={
        "flag": "--e8-rho", "type": float, "help": "2-bit operating RMS of W/scale before the grid (default 1.03)"})
    rvq3_scales: tuple[float, float] = field(default=(0.98, 2.04), metadata={
        "flag": "--e8-rvq3-scales", "type": _floats,
        "help": "3-bit rho and residual scale (default 0.98,2.04)"})
    rvq4_scales: tuple[float, float] = field(default=(0.9, 3.85), metadata={
        "flag": "--e8-rvq4-scales", "type": _floats,
        "help": "4-bit rho and residual scale (default 0.9,3.85)"})
    act_order: bool = field(default=False, metadata={
        "flag": "--e8-act-order", "action": "store_true",
        "help": "visit columns by decreasing XᵀX diagonal (stores the permutation)"})
    candidate_bits: tuple[int, ...] = field(default=(2, 3, 4), metadata={
        "flag": "--candidate-bits", "type": "ints", "help": "bit-widths the allocator may choose (default 2,3,4)"})
    buffer: int = 128

    def __post_init__(self):
        for b in self.candidate_bits:
            if b not in E8_BITS:
                raise ValueError(f"e8 bit-widths must be among 2, 3, 4; got {b}")
        if not 0.0 <= self.ldlq_damp < 10:
            raise ValueError(f"--e8-damp must be in [0, 10), got {self.ldlq_damp}")
        if not self.scale_multipliers or min(self.scale_multipliers) <= 0:
            raise ValueError(f"--e8-scale-grid needs positive multipliers, got {self.scale_multipliers}")
        for name in ("rvq3_scales", "rvq4_scales"):
            v = getattr(self, name)
            if len(v) != 2 or min(v) <= 0:
                raise ValueError(f"{name} must be two positive numbers (rho, residual scale), got {v}")
        if self.e8p_rho <= 0:
            raise ValueError(f"--e8-rho must be positive, got {self.e8p_rho}")

    def rho_and_resid(self, bits: int) -> tuple[float, float]:
        if bits == 2:
            return self.e8p_rho, 1.0
        return tuple(self.rvq3_scales if bits == 3 else self.rvq4_scales)


def _groups(in_features: int) -> int:
    return math.ceil(in_features / CODE_DIM)


def _perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= _INT16_MAX_INDEX else torch.int32


def e8p_stored_bits(s: E8Setting, out_features: int, in_features: int) -> int:
    """Exact stored bits: 16 per 8 weights for each E8P stage, 8 for the 3-bit residual stage, 16 per
    fp16 stage scale, and the column permutation under act_order (padding to 8 inputs included)."""
    cells = out_features * _groups(in_features)
    total = cells * 16 + {3: cells * 8, 4: cells * 16}.get(s.bits, 0) + 16 * stage_count(s.bits)
    if s.act_order:
        total += in_features * torch.iinfo(_perm_dtype(in_features)).bits
    return total


def empty_e8p_tensors(meta: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the stored shapes/dtypes, to load a state dict into."""
    bits, out_f, in_f = meta["bits"], meta["out_features"], meta["in_features"]
    g = _groups(in_f)
    t = {"codes": torch.zeros(out_f, g, dtype=torch.int16),
         "scales": torch.zeros(stage_count(bits), dtype=torch.float16)}
    if bits == 3:
        t["codes2"] = torch.zeros(out_f, g, dtype=torch.uint8)
    elif bits == 4:
        t["codes2"] = torch.zeros(out_f, g, dtype=torch.int16)
    if meta.get("act_order"):
        t["perm"] = torch.zeros(in_f, dtype=_perm_dtype(in_f))
    return t


def _to_int16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes in [0, 2^16) as int16 two's complement."""
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


def _slab_decoder(qw: QuantizedWeight):
    """decode(start, end) -> (end - start, 8·G) float32 rows of the stored (permuted, padded) matrix."""
    bits = qw.meta["bits"]
    codes, scales = qw.tensors["codes"], qw.tensors["scales"].float()
    second = qw.tensors.get("codes2")

    def decode(start: int, end: int) -> torch.Tensor:
        w = e8p_decode(codes[start:end]).mul_(scales[0])
        if bits == 4:
            w.add_(e8p_decode(second[start:end]).mul_(scales[1]))
        elif bits == 3:
            w.add_(e8_1bit_decode(second[start:end]).mul_(scales[1]))
        return w.reshape(end - start, -1)

    return decode


def e8p_row_reader(qw: QuantizedWeight):
    """read(start, end) -> float32 weight rows [start, end), in the original column order."""
    in_f = qw.meta["in_features"]
    decode = _slab_decoder(qw)
    perm = qw.tensors.get("perm")
    inverse = torch.argsort(perm.long()) if perm is not None else None

    def read(start: int, end: int) -> torch.Tensor:
        w = decode(start, end)[:, :in_f]
        return w[:, inverse] if inverse is not None else w.contiguous()

    return read


def dequantize_e8p(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 weight (out, in) from the stored codes and scales."""
    return e8p_row_reader(qw)(0, qw.meta["out_features"])


def e8p_cpu_matmul(module, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b on CPU, rebuilding W a slab of output rows at a time through the 256×8 tables.

    The input is permuted (act_order) and zero-padded to 8·G columns once, so each slab is used as
    decoded; no full dense copy of W is kept.
    """
    m = module.meta
    in_f, out_f = m["in_features"], m["out_features"]
    qw = module.quantized_weight()
    decode = _slab_decoder(qw)
    width = CODE_DIM * _groups(in_f)
    xs = x.reshape(-1, in_f)
    perm = qw.tensors.get("perm")
    if perm is not None:
        xs = xs[:, perm.long()]
    if width != in_f:
        xs = F.pad(xs, (0, width - in_f))
    y = matmul_by_slabs(xs, decode, out_f, _CPU_SLAB_ELEMENTS)
    if module.bias is not None:
        y += module.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


E8P_FORMAT = StorageFormat(FORMAT, dequantize_e8p, empty_e8p_tensors, e8p_stored_bits, e8p_row_reader,
                           kernels={"cpu": e8p_cpu_matmul})


@register
class E8Quantizer(Quantizer):
    """E8P lattice codes with BlockLDLQ (format "e8p"); uses XᵀX (the identity if none is given)."""

    name = "e8"
    Config = E8Options
    format = E8P_FORMAT

    def candidates(self) -> list[E8Setting]:
        return [E8Setting(b, self.config.act_order) for b in sorted(set(self.config.candidate_bits))]

    def uniform_setting(self, bits: float) -> E8Setting:
        if bits not in E8_BITS:
            raise ValueError(f"the e8 quantizer stores 2, 3 or 4 bits per weight, not {bits}")
        return E8Setting(int(bits), self.config.act_order)

    def quantize(self, weight: torch.Tensor, xtx: torch.Tensor | None,
                 setting: E8Setting) -> tuple[QuantizedWeight, torch.Tensor]:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        if xtx is None:
            xtx = torch.eye(in_f, device=weight.device)
        c = self.config
        rho, resid = c.rho_and_resid(setting.bits)
        r = quantize_matrix(weight, xtx, setting.bits, rho=rho, resid_scale=resid, multipliers=c.scale_multipliers,
                            damp=c.ldlq_damp, act_order=setting.act_order, buffer=c.buffer)
        tensors = {"codes": _to_int16(r.codes[..., 0]),
                   "scales": torch.tensor(r.scales, dtype=torch.float16, device=weight.device)}
        if setting.bits == 4:
            tensors["codes2"] = _to_int16(r.codes[..., 1])
        elif setting.bits == 3:
            tensors["codes2"] = r.codes[..., 1].to(torch.uint8)
        if setting.act_order:
            tensors["perm"] = r.perm.to(_perm_dtype(in_f))
        meta = {"format": FORMAT, "method": self.name, "bits": setting.bits, "act_order": setting.act_order,
                "out_features": out_f, "in_features": in_f}
        qw = QuantizedWeight(tensors={k: v.contiguous() for k, v in tensors.items()}, meta=meta)
        return qw, dequantize_e8p(qw)
