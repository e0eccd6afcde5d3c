"""`--quantizer aqlm`: additive vector quantization (AQLM-style), searched and fitted on the CPU.

Each run of g consecutive input weights of output row r is s_r · Σ_m C_m[b_{r,grp,m}]: M learned
codebooks of K = 2^B vectors of dimension g, one fp16 scale per output row
(`casp.algorithms.additive`: residual k-means init, beam search of the codes and least-squares
codebooks/scales on the proxy loss tr(ΔHΔᵀ), alternated). A setting "MxB g" stores M·B/g bits per
weight of codes plus its codebooks and scales; with the defaults (B = 8, g = 8) 2, 3 and 4 bits are
M = 2, 3 and 4 codebooks of 256 entries. The number of codebooks follows from the bit-width:
M = bits·g/B (so `--aqlm-codebook-bits 16 --bits 2` is AQLM's "1x16").

Stored tensors of format "aqlm" (G = ⌈in_features/g⌉; in_features that are not a multiple of g are
padded with zero weights, and the padding is stored and counted):
    codes      uint8 (out, G, M)   B = 8
               int16 (out, G, M)   8 < B ≤ 16 (16-bit codes as two's complement)
               int32 (out, words)  B < 8: the (out, G·M) codes, group-major, packed by `pack_codes`
    codebooks  fp16 (M, 2^B, g)
    scales     fp16 (out,)
meta: format="aqlm", method="aqlm", bits (M·B/g), num_codebooks, codebook_bits, group_size,
out_features, in_features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from casp.algorithms.additive import quantize_additive, reconstruct
from casp.quant.base import QuantizedWeight, Quantizer, StorageFormat, matmul_by_slabs, register
from casp.quant.kernel_registry import declare_kernels
from casp.quant.packing import pack_codes, packed_bits, packed_words, unpack_codes

FORMAT = "aqlm"
MAX_CODEBOOK_BITS = 16
_CPU_SLAB_ELEMENTS = 1 << 20
LUT_MAX_TOKENS = 8          # the CPU kernel uses lookup tables up to this many input rows
LUT_MAX_CODEBOOK_BITS = 8   # ... and codebooks of up to 2^8 entries


@dataclass(frozen=True)
class AQLMSetting:
    """M codebooks of 2^B entries of dimension g: M·B/g bits per weight of codes."""

    num_codebooks: int
    codebook_bits: int = 8
    group_size: int = 8

    @property
    def bits(self) -> float:
        return self.num_codebooks * self.codebook_bits / self.group_size

    def label(self) -> str:
        return f"aqlm-{self.num_codebooks}x{self.codebook_bits}g{self.group_size}"

    def describe(self) -> dict:
        b = self.bits
        return {"bits": int(b) if b == int(b) else b, "num_codebooks": self.num_codebooks,
                "codebook_bits": self.codebook_bits, "group_size": self.group_size}


def _codebooks(bits: float, codebook_bits: int, group_size: int) -> int:
    """M = bits·g/B when that is a positive integer, else 0."""
    m = bits * group_size / codebook_bits
    return int(m) if m == int(m) and m >= 1 else 0


def setting_for_bits(bits: float, codebook_bits: int, group_size: int) -> AQLMSetting:
    """The setting of `bits` code bits per weight: M = bits·g/B codebooks (a positive integer)."""
    m = _codebooks(bits, codebook_bits, group_size)
    if not m:
        raise ValueError(f"aqlm: {bits} bits per weight need bits·g/B = {bits}·{group_size}/{codebook_bits} "
                         f"codebooks, which is not a positive integer")
    return AQLMSetting(m, codebook_bits, group_size)


@dataclass(frozen=True)
class AQLMOptions:
    """Options of the aqlm quantizer (`candidate_bits` shares its --candidate-bits flag with the others)."""

    codebook_bits: int = field(default=8, metadata={
        "flag": "--aqlm-codebook-bits", "type": int,
        "help": "bits B per code: each codebook has 2^B entries (default 8; 16 is AQLM's large-codebook form)"})
    group_size: int = field(default=8, metadata={
        "flag": "--aqlm-group", "type": int, "help": "input weights per code vector g (default 8)"})
    candidate_bits: tuple[int, ...] = field(default=(2, 3, 4), metadata={
        "flag": "--candidate-bits", "type": "ints", "help": "bit-widths the allocator may choose (default 2,3,4)"})
    beam: int = field(default=4, metadata={
        "flag": "--aqlm-beam", "type": int, "help": "beam width of the code search (1: greedy; default 4)"})
    rounds: int = field(default=4, metadata={
        "flag": "--aqlm-rounds", "type": int,
        "help": "rounds of [codebook+scale least squares, beam-search pass] (default 4)"})
    cg_iters: int = field(default=4, metadata={
        "flag": "--aqlm-cg-iters", "type": int, "help": "conjugate-gradient steps per codebook update (default 4)"})
    damp: float = field(default=0.01, metadata={
        "flag": "--damp", "aliases": ("--aqlm-damp",), "type": float, "help": "damping of XᵀX (fraction of its mean diagonal; default 0.01)"})
    kmeans_iters: int = field(default=8, metadata={
        "flag": "--aqlm-kmeans-iters", "type": int, "help": "k-means iterations per codebook at init (default 8)"})
    finetune_steps: int = field(default=0, metadata={
        "flag": "--aqlm-finetune-steps", "type": int,
        "help": "Adam steps on codebooks and scales after the rounds, on the proxy loss (default 0)"})
    finetune_lr: float = field(default=1e-3, metadata={
        "flag": "--aqlm-finetune-lr", "type": float, "help": "learning rate of those steps (default 1e-3)"})
    seed: int = field(default=0, metadata={
        "flag": "--aqlm-seed", "type": int, "help": "seed of the k-means initialisation (default 0)"})
    ridge: float = 1e-4

    def __post_init__(self):
        if not 1 <= self.codebook_bits <= MAX_CODEBOOK_BITS:
            raise ValueError(f"--aqlm-codebook-bits must be in 1..{MAX_CODEBOOK_BITS}, got {self.codebook_bits}")
        if self.group_size < 1:
            raise ValueError(f"--aqlm-group must be positive, got {self.group_size}")
        if not any(_codebooks(b, self.codebook_bits, self.group_size) for b in self.candidate_bits):
            raise ValueError(f"aqlm: none of the candidate bit-widths {self.candidate_bits} is a whole number of "
                             f"{self.codebook_bits}-bit codebooks per {self.group_size} weights")
        for name in ("beam", "cg_iters", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"aqlm option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("rounds", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"aqlm option {name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.damp < 10:
            raise ValueError(f"--aqlm-damp must be in [0, 10), got {self.damp}")


def _groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def _code_dtype(codebook_bits: int) -> torch.dtype | None:
    """uint8 for B = 8, int16 above; None: packed int32 words (B < 8)."""
    if codebook_bits == 8:
        return torch.uint8
    return torch.int16 if codebook_bits > 8 else None


def aqlm_stored_bits(s: AQLMSetting, out_features: int, in_features: int) -> int:
    """Exact stored bits: the codes (8 or 16 bits each, or packed below 8 bits), the fp16 codebooks
    (M·2^B·g·16) and the fp16 per-row scales (16·out); padding to g inputs included."""
    cells = _groups(in_features, s.group_size) * s.num_codebooks
    dtype = _code_dtype(s.codebook_bits)
    codes = (out_features * cells * torch.iinfo(dtype).bits if dtype is not None
             else packed_bits(out_features, cells, s.codebook_bits))
    return codes + s.num_codebooks * (1 << s.codebook_bits) * s.group_size * 16 + out_features * 16


def _meta_setting(meta: dict) -> AQLMSetting:
    return AQLMSetting(meta["num_codebooks"], meta["codebook_bits"], meta["group_size"])


def empty_aqlm_tensors(meta: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the stored shapes/dtypes, to load a state dict into."""
    s = _meta_setting(meta)
    out_f, groups = meta["out_features"], _groups(meta["in_features"], s.group_size)
    dtype = _code_dtype(s.codebook_bits)
    codes = (torch.zeros(out_f, groups, s.num_codebooks, dtype=dtype) if dtype is not None
             else torch.zeros(out_f, packed_words(groups * s.num_codebooks, s.codebook_bits), dtype=torch.int32))
    return {"codes": codes,
            "codebooks": torch.zeros(s.num_codebooks, 1 << s.codebook_bits, s.group_size, dtype=torch.float16),
            "scales": torch.zeros(out_f, dtype=torch.float16)}


def pack_aqlm_codes(codes: torch.Tensor, codebook_bits: int) -> torch.Tensor:
    """Codes (out, G, M) in [0, 2^B) as stored (see the module docstring)."""
    dtype = _code_dtype(codebook_bits)
    if dtype is None:
        return pack_codes(codes.reshape(codes.shape[0], -1), codebook_bits)
    c = codes.to(torch.int32)
    if dtype == torch.int16:
        c = torch.where(c >= 1 << 15, c - (1 << 16), c)
    return c.to(dtype).contiguous()


def unpack_aqlm_codes(stored: torch.Tensor, meta: dict, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Stored codes of rows [start, end) as int64 (rows, G, M)."""
    s = _meta_setting(meta)
    groups = _groups(meta["in_features"], s.group_size)
    part = stored[start:end]
    if _code_dtype(s.codebook_bits) is None:
        flat = unpack_codes(part, s.codebook_bits, groups * s.num_codebooks, torch.int64)
        return flat.reshape(-1, groups, s.num_codebooks)
    return part.long() & ((1 << s.codebook_bits) - 1)


def _slab_decoder(qw: QuantizedWeight):
    """decode(start, end) -> (end - start, G·g) float32 rows of the stored (padded) matrix."""
    books = qw.tensors["codebooks"].float()
    scales = qw.tensors["scales"].float()
    codes = qw.tensors["codes"]

    def decode(start: int, end: int) -> torch.Tensor:
        return scales[start:end, None] * reconstruct(unpack_aqlm_codes(codes, qw.meta, start, end), books)

    return decode


def aqlm_row_reader(qw: QuantizedWeight):
    """read(start, end) -> float32 weight rows [start, end)."""
    in_f = qw.meta["in_features"]
    decode = _slab_decoder(qw)
    return lambda start, end: decode(start, end)[:, :in_f].contiguous()


def dequantize_aqlm(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 weight (out, in) from the stored codes, codebooks and scales."""
    return aqlm_row_reader(qw)(0, qw.meta["out_features"])


def aqlm_cpu_matmul(module, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b on CPU without the dense W.

    Up to `LUT_MAX_TOKENS` input rows and codebooks of at most 2^`LUT_MAX_CODEBOOK_BITS` entries:
    lookup tables, x_grp·C_m[k] for every group, codebook and entry (T·G·M·K products), then each
    output is s_r times a sum of G·M gathered entries. Otherwise W is rebuilt a slab of output rows at
    a time and multiplied (with 2^16 entries the tables would be larger than W). Computes in float32
    for the tables, in x's dtype for the slabs. (`casp.nn.aqlm_kernels` is the faster path registered
    for large layers; this one serves the calls it declines.)
    """
    m = module.meta
    in_f, out_f = m["in_features"], m["out_features"]
    qw = module.quantized_weight()
    s = _meta_setting(m)
    groups = _groups(in_f, s.group_size)
    width = groups * s.group_size
    xs = x.reshape(-1, in_f)
    if width != in_f:
        xs = F.pad(xs, (0, width - in_f))
    tokens = xs.shape[0]
    if tokens <= LUT_MAX_TOKENS and s.codebook_bits <= LUT_MAX_CODEBOOK_BITS:
        books = qw.tensors["codebooks"].float()
        k_count = books.shape[1]
        lut = torch.einsum("tgd,mkd->tgmk", xs.float().view(tokens, groups, s.group_size), books)
        codes = unpack_aqlm_codes(qw.tensors["codes"], m)
        idx = (codes + (torch.arange(groups)[:, None] * s.num_codebooks + torch.arange(s.num_codebooks)) * k_count)
        y = lut.reshape(tokens, -1).index_select(1, idx.reshape(-1)).view(tokens, out_f, -1).sum(-1)
        y = (y * qw.tensors["scales"].float()).to(x.dtype)
    else:
        y = matmul_by_slabs(xs, _slab_decoder(qw), out_f, _CPU_SLAB_ELEMENTS)
    if module.bias is not None:
        y += module.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


AQLM_FORMAT = StorageFormat(FORMAT, dequantize_aqlm, empty_aqlm_tensors, aqlm_stored_bits, aqlm_row_reader,
                            tunable=("codebooks", "scales"))
declare_kernels(FORMAT, cpu="casp.nn.aqlm_kernels:aqlm_fast_cpu_matmul")   # lookup tables, else aqlm_cpu_matmul


@register
class AQLMQuantizer(Quantizer):
    """Additive codebooks (format "aqlm"); uses XᵀX (the identity if none is given)."""

    name = "aqlm"
    Config = AQLMOptions
    format = AQLM_FORMAT

    def candidates(self) -> list[AQLMSetting]:
        """One setting per candidate bit-width that is a whole number of codebooks (the others are skipped:
        with B = 16, g = 8 the defaults 2, 3, 4 give 1x16 and 2x16)."""
        c = self.config
        return [setting_for_bits(b, c.codebook_bits, c.group_size) for b in sorted(set(c.candidate_bits))
                if _codebooks(b, c.codebook_bits, c.group_size)]

    def uniform_setting(self, bits: float) -> AQLMSetting:
        return setting_for_bits(bits, self.config.codebook_bits, self.config.group_size)

    def quantize(self, weight: torch.Tensor, xtx: torch.Tensor | None,
                 setting: AQLMSetting) -> tuple[QuantizedWeight, torch.Tensor]:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        c = self.config
        r = quantize_additive(weight, xtx, setting.num_codebooks, setting.codebook_bits, setting.group_size,
                              beam=c.beam, rounds=c.rounds, cg_iters=c.cg_iters, ridge=c.ridge, damp=c.damp,
                              kmeans_iters=c.kmeans_iters, finetune_steps=c.finetune_steps,
                              finetune_lr=c.finetune_lr, seed=c.seed)
        tensors = {"codes": pack_aqlm_codes(r.codes, setting.codebook_bits),
                   "codebooks": r.codebooks.half().contiguous(),
                   "scales": r.scales.half().contiguous()}
        meta = {"format": FORMAT, "method": self.name, **setting.describe(), "out_features": out_f,
                "in_features": in_f}
        qw = QuantizedWeight(tensors, meta)
        return qw, dequantize_aqlm(qw)
