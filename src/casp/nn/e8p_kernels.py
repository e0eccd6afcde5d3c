"""Small-batch CPU matmul for the E8P lattice format ("e8p") on torch's int4 kernel.

`e8p_fast_cpu_matmul` is the format's CPU kernel, declared where the format is defined (`casp.quant.e8`).

Method: every E8P codeword coordinate is an odd multiple of 1/4 in [-2.75, 2.75] (|x| ∈ {½, 3/2,
5/2} plus a ±¼ shift), so v = (q - 8)·½ - ¼ with q = 2v + 8.5 ∈ [3, 14]; every coordinate of the
3-bit residual table is in {0, ±½, ±1, ±2}, so v = (q - 8)·½ with q = 2v + 8 ∈ [4, 12]. A layer is
repacked once, at first use, into the int4 layout of `casp.nn.cpu_kernels` with kernel scale ½ and
zero -¼ (E8P stage) or 0 (residual stage), both exact in bfloat16: the kernel's weights are the
stage codewords exactly. Each stage is one block of K (2 bits: one, 3/4 bits: two, the x copies
side by side, 4 bits of codes per weight and stage; 5/6 bits: three), and the stage's fp16 scale multiplies its copy
of x in float32 before the bfloat16 rounding, so no scale is rounded. The act-order permutation is
applied to the columns at repack time and the padding to 8·⌈in/8⌉ columns is dropped, so the kernel's
K is the layer's own input order (padded to a multiple of 32 with zero inputs).

Accuracy (bfloat16 unit roundoff u = 2^-8): x·s_k is rounded once (≤ u relative), products are
exact and summed in float32, the output is rounded once to bfloat16 (≤ u·|y|). With Ŵ_k = s_k·V_k
the float32 stage weights of `dequantize_e8p`, elementwise
    |y - x·Ŵᵀ - b| ≤ u·|x·Ŵᵀ| + (2u + 3·in·2^-24)·Σ_i |x_i|·Σ_k |Ŵ_k[n, i]|
(the second u and the in-term cover the float32 sums of the kernel and of the reference;
see tests/nn/test_vector_kernels.py, which checks it on matrices from the quantizer); measured
‖Δy‖/‖y‖ ≈ 1.7e-3 (quantized matrices) to 2.4e-3 (random codes).

Speed (benchmarks/inference.py, one AVX512 core, against dense float32): 2 bits read 4 bits per
weight, 3 and 4 bits 8: batch 1 at LLaMA-7B shapes 5-11x (2 bits) and 2.3-5x (3/4 bits), batch 16
3-3.3x and 1.5-1.7x; SmolLM2 shapes, whose dense weights fit in cache, 1.25-2.1x and 0.8-1.5x.
Repacking costs ~0.1 s per 4096x4096 stage at first use.

The repacked weight (4 bits per weight and stage, bfloat16 scale/zero pairs) is cached on the module
like the scalar kernel's, never stored; `.to()`, loading and `clear_cache` drop it.

Declines to the format's slab kernel (`casp.quant.e8.e8p_cpu_matmul`) on the rules of
`casp.nn.cpu_kernels` (x not float32 or needing a gradient, more than `MAX_TOKENS` rows, fewer than
`MIN_WEIGHTS` weights, no AVX2/AVX512, torch without the ops); to the generic path when the module
has `cache_dequantized` set.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from casp.algorithms.e8p import e8_1bit_table, e8p_codebook, stage_kinds
from casp.nn import cpu_kernels as ck
from casp.quant.e8 import code_names, e8p_cpu_matmul

_E8P_ZERO = -0.25            # q = 2v + 8.5 with kernel scale ½ and zero -¼
_RESIDUAL_ZERO = 0.0         # 3-bit residual stage: q = 2v + 8, zero 0


@functools.cache
def _q_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's q of every E8P code (2^16) and every residual code (256), the 8 uint8 values of a
    code packed in one int64 (so that decoding is a gather of 8-byte words)."""
    e8p = (e8p_codebook(torch.float32) * 2 + 8.5).round_().to(torch.uint8)
    residual = (e8_1bit_table(torch.float32) * 2 + 8).round_().to(torch.uint8)
    return e8p.view(torch.int64).view(-1), residual.view(torch.int64).view(-1)


def _stages(module) -> list[tuple[torch.Tensor, int, torch.Tensor, float]]:
    """(codes, code mask, q table, zero) of each stored stage."""
    e8p, residual = _q_tables()
    bits = module.meta["bits"]
    return [(getattr(module, name), 0xFFFF, e8p, _E8P_ZERO) if kind == "p"
            else (getattr(module, name), 0xFF, residual, _RESIDUAL_ZERO)
            for name, kind in zip(code_names(bits), stage_kinds(bits))]


def stage_codes(module, start: int, end: int) -> list[torch.Tensor]:
    """The kernel's int32 values q (end - start, in_features) of each stage for rows [start, end), in
    input order: stage k's weights are s_k·((q - 8)·½ + zero_k) exactly."""
    k = module.in_features
    perm = module._buffers.get("perm")
    inverse = torch.argsort(perm.long()) if perm is not None else None
    out = []
    for codes, mask, table, _ in _stages(module):
        words = table.index_select(0, (codes[start:end].long() & mask).view(-1))
        q = words.view(torch.uint8).view(end - start, -1)[:, :k]
        out.append((q[:, inverse] if inverse is not None else q).to(torch.int32))
    return out


def stage_zeros(module) -> list[float]:
    """The kernel's zero term of each stage (with scale ½)."""
    return [zero for *_, zero in _stages(module)]


def repack_e8p(module) -> ck.Int4Weight:
    """The int4 kernel's layout of an "e8p" `PackedLinear`: one block of K per stage, input order."""
    n, k = module.out_features, module.in_features
    k_pad = ck.padded_inputs(k)
    group = ck.largest_group(k_pad)

    def read_q(start: int, end: int) -> torch.Tensor:
        return torch.cat([F.pad(q, (0, k_pad - k), value=8) for q in stage_codes(module, start, end)], dim=1)

    pairs = torch.tensor([[0.5, zero] for zero in stage_zeros(module)])
    sz = pairs.repeat_interleave(k_pad // group, dim=0).expand(n, -1, -1)
    x_scales = tuple(float(s) for s in module.scales.float())
    return ck.Int4Weight(ck.buffers_key(module), ck.pack_int4(read_q, n, k_pad * len(pairs)),
                         ck.pack_scales_zeros(sz), group, k_pad, x_scales)


def e8p_fast_cpu_matmul(module, x: torch.Tensor) -> torch.Tensor | None:
    """y = x Wᵀ + b for an "e8p" `PackedLinear` on CPU via the int4 kernel, else the slab kernel."""
    if module.cache_dequantized:
        return None
    if not ck.declines(module, x):
        w = ck.cached_layout(module, repack_e8p)
        if w is not None:
            return ck.int4_matmul(w, x, module.out_features, module.bias)
    return e8p_cpu_matmul(module, x)

