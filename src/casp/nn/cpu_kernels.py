"""Small-batch CPU matmul for the scalar format on torch's own int4 kernel (no extension to build).

`scalar_cpu_matmul(module, x)` is the scalar format's CPU kernel (declared in `casp.quant.scalar`). It computes
y = x Wᵀ + b with `torch.ops.aten._weight_int4pack_mm_for_cpu`, which reads 4 bits per weight
instead of dense float32's 32; at batch 1 the matmul is memory-bound, so that is the speed-up.

What the int4 kernel takes (torch 2.13, measured): codes packed by
`_convert_weight_to_int4pack_for_cpu` from int32 (N, K) values in [0, 16) with N a multiple of 16;
group sizes 32, 64, 128 or 256 dividing K; `qScaleAndZeros` (K/G, N, 2) in the input's dtype with
w = (q - 8)·scale + zero. Only bfloat16 inputs take a vectorized path (AVX2/AVX512): float32 and
float16 inputs run a scalar loop ~9x slower than dense float32. So x is rounded to bfloat16, the
kernel accumulates in float32 and writes bfloat16; the result is returned in float32.

Mapping of the stored grid w = (code - z)·s (s fp16, z integer or (2^b - 1)/2):
- b ≤ 4: q = code + c with c = clamp(floor(8 - z), 0, 16 - 2^b), zero = (8 - c - z)·s. For 2 and 3
  bits c absorbs the zero point, so zero is 0 (asymmetric) or s/2 (symmetric), exact in bfloat16;
  for 4 bits c = 0 and zero = (8 - z)·s is rounded to bfloat16.
- b = 8: code = 16·hi + lo, w = 16s·(hi - 8) + s·(lo - 8) + (136 - z)·s: the two nibble matrices
  side by side along K (x repeated), one kernel call reading 8 bits per weight.
A stored group of g columns becomes g/G kernel groups (G ∈ {256, 128, 64, 32} dividing g and the
32-padded K; per-channel repeats the row's scale); K is padded with zero inputs to a multiple of 32,
N with zero rows to a multiple of 16.

Accuracy (bfloat16 unit roundoff u = 2^-8): the output is rounded once (≤ u·|y|); each product
carries the rounding of x and of the scale (≤ u each, relative to the weight) and of the zero term
(≤ u·|8 - c - z|·s: 0 for 2/3-bit asymmetric, ≤ 8s for 4 bits, ≤ 136s for 8 bits). Elementwise
|y - x·Ŵᵀ| ≤ u·|y| + u·Σ_k |x_k|·(2|ŵ_nk| + 2^b·s_nk), with Ŵ the float32 dequantized weight.
Measured ‖Δy‖/‖y‖ ≈ 3e-3 (random weights and inputs), that of running the layer in bfloat16.

The repacked weight (4 bits per weight for b ≤ 4, 8 for b = 8, plus bfloat16 scale/zero pairs) is
built on first use and cached on the module, never stored; `PackedLinear.clear_cache`, `.to()` and
loading drop it, and it is rebuilt if a stored buffer changes in place.

Declines (returns None, the generic dequantize + F.linear path runs) when: x is not float32 or needs
a gradient; more than `MAX_TOKENS` rows (prefill and calibration keep float32 results); the module
has `cache_dequantized` set (an explicit request for the dense float path); the layer has fewer
than `MIN_WEIGHTS` weights (toy layers keep exact float32 results, at a cost of tens of µs); the
group size is not a multiple of 32; the CPU has neither AVX2 nor AVX512 (torch's bfloat16 path is
not vectorized there); or the running torch lacks the ops. To force the generic path everywhere:
`casp.quant.kernel_registry.unregister_matmul_kernel("scalar", "cpu")`.

The int4 pieces (`pack_int4`, `pack_scales_zeros`, `int4_matmul`) and the cache and decline rules
(`cached_layout`, `declines`) are plain functions shared with the vector formats' kernels
(`casp.nn.e8p_kernels`, `casp.nn.aqlm_kernels`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from casp.nn.packed_linear import buffers_key
from casp.quant.packing import unpack_codes
from casp.quant.scalar import num_groups

MAX_TOKENS = 32          # small-batch decoding; on AVX2 the kernel's edge over dense is gone by 32-64 rows
MIN_WEIGHTS = 1 << 16    # smaller (toy) layers keep exact float32 results; they cost microseconds either way
_KERNEL_GROUPS = (256, 128, 64, 32)
_FAST_CAPABILITIES = ("AVX2", "AVX512")
_REPACK_ROWS = 512       # rows unpacked at a time while repacking (a multiple of the kernel's 64-row blocks)
_fast_cpu: bool | None = None


def kernel_available() -> bool:
    """torch has the int4 ops and a vectorized bfloat16 path on this CPU (checked once)."""
    global _fast_cpu
    if _fast_cpu is None:
        ops = torch.ops.aten
        _fast_cpu = (hasattr(ops, "_weight_int4pack_mm_for_cpu")
                     and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
                     and torch.backends.cpu.get_cpu_capability() in _FAST_CAPABILITIES)
    return _fast_cpu


@dataclass
class Int4Weight:
    """A layer repacked for `_weight_int4pack_mm_for_cpu`, with the stored buffers it came from.

    The kernel's K holds one block of `k_pad` columns per entry of `x_scales`; block c is multiplied
    by x·x_scales[c] (8-bit scalar: the hi and lo nibbles; E8P: one block per code stage).
    """

    key: tuple
    packed: torch.Tensor          # uint8 (n_pad, k_kernel / 2), torch's int4 layout
    scales_zeros: torch.Tensor    # bfloat16 (k_kernel / group, n_pad, 2)
    group: int                    # kernel group size
    k_pad: int                    # columns per copy of x (in_features padded to a multiple of 32)
    x_scales: tuple[float, ...] = (1.0,)


def kernel_layout(meta: dict) -> tuple[int, int] | None:
    """(kernel group size, padded in_features) for a scalar layer, or None if the kernel cannot take it.

    The kernel group is the largest size that divides the stored group and pads in_features only to
    a multiple of 32 (so 576 columns in groups of 128 run as 9 kernel groups of 64, unpadded).
    """
    bits, gs, k = meta["bits"], meta["group_size"], meta["in_features"]
    if bits not in (2, 3, 4, 8) or (gs != -1 and gs % 32):
        return None
    k_pad = padded_inputs(k)
    group = next(G for G in _KERNEL_GROUPS if k_pad % G == 0 and (gs == -1 or gs % G == 0))
    return group, k_pad


def padded_inputs(in_features: int) -> int:
    """in_features padded to the kernel's multiple of 32."""
    return math.ceil(in_features / 32) * 32


def largest_group(k_pad: int) -> int:
    """The largest kernel group size dividing k_pad (for weights whose scale is constant along K)."""
    return next(G for G in _KERNEL_GROUPS if k_pad % G == 0)


def pack_int4(read_q, n: int, k_total: int) -> torch.Tensor:
    """torch's int4 layout of an (n, k_total) matrix of int32 values in [0, 16).

    `read_q(start, end)` gives rows [start, end) (< n) as int32 (end - start, k_total); rows are read
    `_REPACK_ROWS` at a time and padded with 8s (weight = zero term, 0 for a zero scale) to a
    multiple of 16.
    """
    n_pad = math.ceil(n / 16) * 16
    parts = []
    for start in range(0, n_pad, _REPACK_ROWS):
        end = min(start + _REPACK_ROWS, n_pad)
        rows = max(0, min(end, n) - start)
        q = torch.full((end - start, k_total), 8, dtype=torch.int32)
        if rows:
            q[:rows] = read_q(start, start + rows)
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
    return torch.cat(parts)


def pack_scales_zeros(sz: torch.Tensor) -> torch.Tensor:
    """(n, k_kernel / group, 2) float pairs as the kernel's bfloat16 (k_kernel / group, n_pad, 2); pad rows 0."""
    n = sz.shape[0]
    sz = torch.nn.functional.pad(sz, (0, 0, 0, 0, 0, math.ceil(n / 16) * 16 - n))
    return sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def repack(module) -> Int4Weight | None:
    """Build the int4 kernel's layout of a scalar `PackedLinear` (None if unsupported)."""
    m = module.meta
    layout = kernel_layout(m)
    if layout is None:
        return None
    group, k_pad = layout
    bits, gs, sym = m["bits"], m["group_size"], m["sym"]
    n, k = m["out_features"], m["in_features"]
    width = k if gs == -1 else gs
    ng = num_groups(k, gs)

    scale = module.scales.to(torch.bfloat16).float()                # (n, ng), as the kernel sees it
    if sym:
        zero = torch.full_like(scale, ((1 << bits) - 1) / 2.0)
    else:
        zero = unpack_codes(module.zeros, bits, n).t().float()
    if bits == 8:
        shift = torch.zeros_like(zero)
        pairs = [(16 * scale, (136.0 - zero) * scale), (scale, torch.zeros_like(scale))]
    else:
        shift = torch.floor(8.0 - zero).clamp(0, 16 - (1 << bits))
        pairs = [(scale, (8.0 - shift - zero) * scale)]
    of_group = (torch.arange(k_pad // group) * group // width).clamp(max=ng - 1)   # stored group of each kernel group
    sz = torch.cat([torch.stack([s, z], -1).index_select(1, of_group) for s, z in pairs], dim=1)
    shift = shift.to(torch.int32)

    def read_q(start: int, end: int) -> torch.Tensor:
        rows = end - start
        codes = unpack_codes(module.codes[start:end], bits, k, dtype=torch.int32)
        if ng == 1:
            q = torch.nn.functional.pad(codes + shift[start:end], (0, k_pad - k), value=8)
        else:   # ng·width ≥ k_pad: add the shift group-wise, then cut to k_pad
            codes = torch.nn.functional.pad(codes, (0, ng * width - k)).view(rows, ng, width)
            q = (codes + shift[start:end, :, None]).view(rows, ng * width)[:, :k_pad]
        return torch.cat([q >> 4, q & 15], dim=1) if bits == 8 else q

    packed = pack_int4(read_q, n, k_pad * len(pairs))
    return Int4Weight(buffers_key(module), packed, pack_scales_zeros(sz), group, k_pad,
                      (1.0,) * len(pairs))


def declines(module, x: torch.Tensor, max_tokens: int = MAX_TOKENS) -> bool:
    """The shared decline rules on the call: x not float32, x needing a gradient, more than `max_tokens`
    rows, or `cache_dequantized` set on the module."""
    return (x.dtype != torch.float32 or x.numel() > max_tokens * module.in_features or module.cache_dequantized
            or (x.requires_grad and torch.is_grad_enabled()))


def cached_layout(module, build):
    """The module's kernel layout `build(module)` (key = `buffers_key`), rebuilt when the stored buffers
    changed; None if the layer is under `MIN_WEIGHTS`, the CPU lacks AVX2/AVX512 or `build` declines."""
    cache = module.__dict__.get("_kernel_cache")
    if cache is not None and cache.key == buffers_key(module):
        return cache
    m = module.meta
    if m["out_features"] * m["in_features"] < MIN_WEIGHTS or not kernel_available():
        return None
    with torch.no_grad():
        cache = build(module)
    module.__dict__["_kernel_cache"] = cache
    return cache


def int4_matmul(w: Int4Weight, x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + b (float32, x's leading dims) through the int4 kernel for a repacked weight."""
    k = x.shape[-1]
    xs = x.reshape(-1, k)
    if len(w.x_scales) == 1 and w.k_pad == k:
        xb = (xs if w.x_scales[0] == 1.0 else xs * w.x_scales[0]).to(torch.bfloat16)
    else:
        xb = xs.new_zeros(xs.shape[0], w.k_pad * len(w.x_scales), dtype=torch.bfloat16)
        for c, s in enumerate(w.x_scales):
            xb[:, c * w.k_pad: c * w.k_pad + k] = xs if s == 1.0 else xs * s
    y = torch.ops.aten._weight_int4pack_mm_for_cpu.default(xb, w.packed, w.group, w.scales_zeros)
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    y = y.float() if bias is None else torch.add(y, bias.float())   # bfloat16 + float32 → float32
    return y.view(*x.shape[:-1], out_features)


def scalar_cpu_matmul(module, x: torch.Tensor) -> torch.Tensor | None:
    """y = x Wᵀ + b for a scalar-format `PackedLinear` on CPU via torch's int4 kernel, or None to decline."""
    if declines(module, x):
        return None
    w = cached_layout(module, repack)
    if w is None:
        return None
    return int4_matmul(w, x, module.out_features, module.bias)

