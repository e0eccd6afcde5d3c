"""`--quantizer e8`: QuIP#-style E8-lattice vector quantization (E8P codebook, BlockLDLQ, residual VQ).

Each run of 8 consecutive input weights of a row is one codeword of E8P (`casp.algorithms.e8p`):
16 bits per 8 weights at 2 bits; each further stage codes the scaled residual of the ones before,
with an 8-bit code of a 256-point E8 codebook (1 bit per weight) or another E8P code (2 bits per
weight): 3 bits = E8P + E8, 4 = 2 × E8P, 5 = 2 × E8P + E8, 6 = 3 × E8P. Rounding is BlockLDLQ with blocks of 8 columns on the damped
XᵀX; one scale per stage and matrix is chosen by trying a few multiples of RMS(W) and keeping the
lowest proxy loss tr(ΔHΔᵀ). With `act_order` the columns are visited by decreasing XᵀX diagonal,
which needs the permutation stored; it pays off when no incoherence transform precedes the
quantizer (see docs/e8.md).

Stored tensors of format "e8p" (G = ⌈in_features/8⌉; in_features that are not a multiple of 8 are
padded with zero weights, and the padding is stored and counted):
    codes   int16 (out, G)   stage-1 E8P codes (the 16-bit code as two's complement)
    codes2  int16 (out, G)   stage-2 codes: int16 for an E8P stage (4-6 bits),
            uint8 (out, G)   uint8 for the 256-point E8 codebook (3 bits)
    codes3  int16 / uint8    stage-3 codes (6 bits: E8P, 5 bits: E8)
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

from casp.algorithms.e8p import (CODE_DIM, STAGE_CODE_BITS, STAGES, StageSpec, quantize_candidates, quantize_matrix,
                                 scale_rms, stage_count, stage_decoder, stage_kinds)
from casp.quant.base import QuantizedWeight, Quantizer, StorageFormat, matmul_by_slabs, register
from casp.quant.kernel_registry import declare_kernels

FORMAT = "e8p"
E8_BITS = tuple(STAGES)
_INT16_MAX_INDEX = 1 << 15
_CPU_SLAB_ELEMENTS = 1 << 20
INCOHERENT = ("incoherence", "incoherence-scaled")       # transforms that rotate W by random Hadamard sides
INCOHERENT_SCALE_MULTIPLIERS = (1.0, 1.1, 1.2)
INCOHERENT_RATIO_ROWS = 64
E8_FISHER_TOKENS = 8192   # the sensitivity pass's tokens under incoherence (`E8Quantizer.sensitivity_tokens`)


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated floats, for tuple-valued flags."""
    import argparse

    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True)
class E8Setting:
    """One E8 setting: 2 to 6 bits per weight (`casp.algorithms.e8p.STAGES`); column order."""

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
        "flag": "--damp", "aliases": ("--e8-damp",), "type": float, "help": "BlockLDLQ damping (fraction of mean diag XᵀX)"})
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
    rvq5_scales: tuple[float, float, float] = field(default=(0.85, 3.85, 2.04), metadata={
        "flag": "--e8-rvq5-scales", "type": _floats,
        "help": "5-bit rho and the residual scales of stages 2 and 3 (default 0.85,3.85,2.04)"})
    rvq6_scales: tuple[float, float, float] = field(default=(0.8, 3.85, 3.4), metadata={
        "flag": "--e8-rvq6-scales", "type": _floats,
        "help": "6-bit rho and the residual scales of stages 2 and 3 (default 0.8,3.85,3.4)"})
    shrink: float = field(default=0.0, metadata={
        "flag": "--hessian-shrink", "aliases": ("--e8-shrink",), "type": float,
        "help": "scale XᵀX's off-diagonal by (1 - this) before BlockLDLQ, in [0, 1] (default 0)"})
    act_order: bool = field(default=False, metadata={
        "flag": "--e8-act-order", "action": "store_true",
        "help": "visit columns by decreasing XᵀX diagonal (stores the permutation)"})
    candidate_bits: tuple[int, ...] = field(default=(2, 3, 4), metadata={
        "flag": "--candidate-bits", "type": "ints",
        "help": "bit-widths the allocator may choose, among 2-6 (default: 2 up to ⌊--bits⌋ + 2, within 4-6)"})
    scale_sample_rows: int = field(default=256, metadata={
        "flag": "--e8-scale-sample-rows", "type": int,
        "help": "rows of a larger matrix the scale multiplier is chosen on before the whole matrix is coded "
                "once (0: every multiplier on every row) (default 256)"})
    ratio_rows: int = field(default=0, metadata={
        "flag": "--e8-ratio-rows", "type": int,
        "help": "rows a probed matrix's settings are measured on, as ratios to its whole probe weight's damage "
                "(0: 256 rows, each setting's damage scaled from them) (default 64 under --incoherence, else 0)"})
    buffer: int = 128

    def __post_init__(self):
        for b in self.candidate_bits:
            if b not in E8_BITS:
                raise ValueError(f"e8 bit-widths must be among 2 to 6; got {b}")
        if not 0.0 <= self.ldlq_damp < 10:
            raise ValueError(f"--e8-damp must be in [0, 10), got {self.ldlq_damp}")
        if not self.scale_multipliers or min(self.scale_multipliers) <= 0:
            raise ValueError(f"--e8-scale-grid needs positive multipliers, got {self.scale_multipliers}")
        for bits in (3, 4, 5, 6):
            v = getattr(self, f"rvq{bits}_scales")
            if len(v) != stage_count(bits) or min(v) <= 0:
                raise ValueError(f"--e8-rvq{bits}-scales must be {stage_count(bits)} positive numbers (rho, then one "
                                 f"residual scale per later stage), got {v}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"--e8-shrink must be in [0, 1], got {self.shrink}")
        if self.e8p_rho <= 0:
            raise ValueError(f"--e8-rho must be positive, got {self.e8p_rho}")
        if self.scale_sample_rows < 0:
            raise ValueError(f"--e8-scale-sample-rows must be >= 0, got {self.scale_sample_rows}")
        if self.ratio_rows < 0:
            raise ValueError(f"--e8-ratio-rows must be >= 0, got {self.ratio_rows}")

    def rho_and_resid(self, bits: int) -> tuple[float, tuple[float, ...]]:
        """The operating RMS of stage 1 and the residual scales of the later stages."""
        if bits == 2:
            return self.e8p_rho, ()
        rho, *ratios = getattr(self, f"rvq{bits}_scales")
        return rho, tuple(ratios)


def _groups(in_features: int) -> int:
    return math.ceil(in_features / CODE_DIM)


_CODE_DTYPES = {"p": torch.int16, "r": torch.uint8}


def code_names(bits: int) -> list[str]:
    """Stored names of the stages' code tensors: codes, codes2, codes3."""
    return ["codes"] + [f"codes{k + 1}" for k in range(1, stage_count(bits))]


def _perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= _INT16_MAX_INDEX else torch.int32


def e8p_stored_bits(s: E8Setting, out_features: int, in_features: int) -> int:
    """Exact stored bits: 16 per 8 weights for each E8P stage, 8 for each 256-point E8 stage, 16 per
    fp16 stage scale, and the column permutation under act_order (padding to 8 inputs included)."""
    cells = out_features * _groups(in_features)
    total = sum(cells * STAGE_CODE_BITS[k] for k in stage_kinds(s.bits)) + 16 * stage_count(s.bits)
    if s.act_order:
        total += in_features * torch.iinfo(_perm_dtype(in_features)).bits
    return total


def empty_e8p_tensors(meta: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the stored shapes/dtypes, to load a state dict into."""
    bits, out_f, in_f = meta["bits"], meta["out_features"], meta["in_features"]
    g = _groups(in_f)
    t = {"scales": torch.zeros(stage_count(bits), dtype=torch.float16)}
    for name, kind in zip(code_names(bits), stage_kinds(bits)):
        t[name] = torch.zeros(out_f, g, dtype=_CODE_DTYPES[kind])
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
    scales = qw.tensors["scales"].float()
    stages = [(qw.tensors[name], stage_decoder(kind)) for name, kind in zip(code_names(bits), stage_kinds(bits))]

    def decode(start: int, end: int) -> torch.Tensor:
        w = None
        for k, (codes, dec) in enumerate(stages):
            v = dec(codes[start:end]).mul_(scales[k])
            w = v if w is None else w.add_(v)
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
                           tunable=("scales",))
declare_kernels(FORMAT, cpu="casp.nn.e8p_kernels:e8p_fast_cpu_matmul")   # int4 kernel, else e8p_cpu_matmul


@register
class E8Quantizer(Quantizer):
    """E8P lattice codes with BlockLDLQ (format "e8p"); uses XᵀX (the identity if none is given)."""

    name = "e8"
    Config = E8Options
    format = E8P_FORMAT
    rows_independent = True   # BlockLDLQ rounds each row on its own; the scale comes from the whole matrix's RMS

    @property
    def ratio_rows(self) -> int:
        return self.config.ratio_rows

    @classmethod
    def target_options(cls, bits: float) -> dict:
        """The ladder reaches two bits past the target's whole part (at least 4, at most 6 bits):
        2-4 bits for targets below 3, up to 5 below 4, up to 6 from 4 bits on."""
        return {"candidate_bits": tuple(range(2, min(6, max(4, math.floor(bits) + 2)) + 1))}

    @classmethod
    def transform_options(cls, transform: str | None) -> dict:
        """Under an incoherence rotation the weights are near Gaussian and a scale below the nominal one never won
        (SmolLM2-135M and Gemma-3-270M, docs/e8.md): the grid starts at the nominal scale, a quarter fewer trials
        in every sweep of the plan and the layer pass. And a matrix's damages at 2, 4 and 5 bits are near fixed
        multiples of its 3-bit one (SmolLM2-135M: 2b/3b within 3.2-3.4 for 80 % of matrices), so 64 rows measure
        those ratios about as well as 256 rows measure the damages (mean error 2.0 % against 0.9 %, docs/e8.md)."""
        if transform not in INCOHERENT:
            return {}
        return {"scale_multipliers": INCOHERENT_SCALE_MULTIPLIERS, "ratio_rows": INCOHERENT_RATIO_ROWS}

    @classmethod
    def sensitivity_tokens(cls, transform: str | None) -> tuple[int, str] | None:
        """Half the default under incoherence: the sensitivity pass's forward and backward were the plan's largest
        fixed part, and on SmolLM2-135M at 3.25 bits a run stored as good a model from 8k tokens as from 16k
        (CASP+GPTQ did not: docs/results.md, 2026-12-07)."""
        if transform not in INCOHERENT:
            return None
        return E8_FISHER_TOKENS, ("E8 under incoherence: a model as good from 8,192 sensitivity tokens as from 16,384 "
                                  "(SmolLM2-135M at 3.25 bits, docs/e8.md), for half the pass")

    def candidates(self) -> list[E8Setting]:
        return [E8Setting(b, self.config.act_order) for b in sorted(set(self.config.candidate_bits))]

    def uniform_setting(self, bits: float) -> E8Setting:
        if bits not in E8_BITS:
            raise ValueError(f"the e8 quantizer stores 2 to 6 bits per weight, not {bits}")
        return E8Setting(int(bits), self.config.act_order)

    def quantize(self, weight: torch.Tensor, xtx: torch.Tensor | None,
                 setting: E8Setting) -> tuple[QuantizedWeight, torch.Tensor]:
        return self.quantize_hinted(weight, xtx, setting, None)

    def quantize_hinted(self, weight: torch.Tensor, xtx: torch.Tensor | None, setting: E8Setting,
                        hint: dict | None) -> tuple[QuantizedWeight, torch.Tensor]:
        """With a hint from `sweep` the matrix is coded once at the scale multiplier the sweep chose for this
        setting; without one the multiplier is chosen here (`_scale_choice`)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        if xtx is None:
            xtx = torch.eye(in_f, device=weight.device)
        c = self.config
        rho, resid = c.rho_and_resid(setting.bits)
        if hint is not None and "multiplier" in hint:
            multipliers = (float(hint["multiplier"]),)
        else:
            multipliers = self._scale_choice(weight, xtx, setting)
        r = quantize_matrix(weight, xtx, setting.bits, rho=rho, resid_scale=resid, multipliers=multipliers,
                            damp=c.ldlq_damp, act_order=setting.act_order, buffer=c.buffer, shrink=c.shrink)
        tensors = {"scales": torch.tensor(r.scales, dtype=torch.float16, device=weight.device)}
        for k, (name, kind) in enumerate(zip(code_names(setting.bits), stage_kinds(setting.bits))):
            tensors[name] = _to_int16(r.codes[..., k]) if kind == "p" else r.codes[..., k].to(torch.uint8)
        if setting.act_order:
            tensors["perm"] = r.perm.to(_perm_dtype(in_f))
        meta = {"format": FORMAT, "method": self.name, "bits": setting.bits, "act_order": setting.act_order,
                "out_features": out_f, "in_features": in_f}
        qw = QuantizedWeight(tensors={k: v.contiguous() for k, v in tensors.items()}, meta=meta)
        return qw, dequantize_e8p(qw)

    def _scale_choice(self, weight: torch.Tensor, xtx: torch.Tensor, setting: E8Setting) -> tuple[float, ...]:
        """The multipliers to code the whole matrix with: all of them, or for a matrix of more than twice
        `scale_sample_rows` rows the one that wins on a fixed row sample (coded with the whole matrix's RMS),
        so the whole matrix is coded once instead of once per multiplier."""
        c = self.config
        out_f = weight.shape[0]
        if len(set(c.scale_multipliers)) < 2 or not c.scale_sample_rows or out_f <= 2 * c.scale_sample_rows:
            return c.scale_multipliers
        g = torch.Generator().manual_seed(out_f * 65537 + weight.shape[1])
        rows = torch.randperm(out_f, generator=g)[:c.scale_sample_rows].sort().values.to(weight.device)
        rho, resid = c.rho_and_resid(setting.bits)
        best = quantize_candidates(weight[rows], xtx, [StageSpec(setting.bits, rho, resid)],
                                   multipliers=c.scale_multipliers, damp=c.ldlq_damp, act_order=setting.act_order,
                                   buffer=c.buffer, shrink=c.shrink, rms=scale_rms(weight, xtx))[0]
        return (best.multiplier,)

    def row_context(self, weight: torch.Tensor, xtx: torch.Tensor | None) -> dict:
        """The whole matrix's `scale_rms`: the scales of a row sample are the whole matrix's."""
        if xtx is None:
            xtx = torch.eye(weight.shape[1], device=weight.device)
        return {"rms": scale_rms(weight, xtx)}

    def dequantize_many(self, weight: torch.Tensor, xtx: torch.Tensor | None, settings,
                        context: dict | None = None) -> list[torch.Tensor]:
        """Every setting and scale in one BlockLDLQ sweep (`quantize_candidates`)."""
        return [d for d, _ in self.sweep(weight, xtx, settings, context)]

    def sweep(self, weight: torch.Tensor, xtx: torch.Tensor | None, settings,
              context: dict | None = None) -> list[tuple[torch.Tensor, dict]]:
        """`dequantize_many`, each weight with the scale multiplier that won for its setting."""
        settings = list(settings)
        if not settings:
            return []
        if len({s.act_order for s in settings}) > 1:
            return [r for s in settings for r in self.sweep(weight, xtx, [s], context)]
        if xtx is None:
            xtx = torch.eye(weight.shape[1], device=weight.device)
        c = self.config
        specs = [StageSpec(s.bits, *c.rho_and_resid(s.bits)) for s in settings]
        found = quantize_candidates(weight, xtx, specs, multipliers=c.scale_multipliers, damp=c.ldlq_damp,
                                    act_order=settings[0].act_order, buffer=c.buffer, shrink=c.shrink,
                                    rms=(context or {}).get("rms"))
        return [(r.weight, {"multiplier": r.multiplier}) for r in found]
