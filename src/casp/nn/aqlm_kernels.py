"""Small-batch CPU matmul for the additive-codebook format ("aqlm") by lookup tables and embedding_bag.

Method: y_r = s_r · Σ_{grp, m} x_grp · C_m[b_{r,grp,m}]. For a chunk of `chunk` input groups the
lookup table L[(m·K + k)·chunk + j, t] = x_t,grp_j · C_m[k] is one float32 matmul
(M·K × g)·(g × chunk·T), small enough to stay in cache; `F.embedding_bag(mode="sum")` then sums, for
every output row, its chunk·M looked-up rows of L (T values each): a fused, multi-threaded
gather-sum in torch. Chunks accumulate into y, then the row scales and the bias are applied. The
flat int32 indices (m·K + code)·chunk + j of every chunk are built once, at first use, and cached on
the module (32 bits per code: 4× the stored 8-bit codes; never stored, dropped on `.to()`, loading
and `clear_cache`).

Accuracy: everything is float32; only the order of the sums differs from dequantize-then-matmul.
Elementwise, with u = 2^-24, G groups of g inputs and M codebooks,
    |y - x·Ŵᵀ - b| ≤ 2(G·M + g + 4)·u · |s_r| · Σ_i |x_i| · Σ_m |C_m[b_{r,i}]_i|.
Measured ‖Δy‖/‖y‖ ≈ 1e-6.

Speed: each code is one table read per token, so the work is out·G·M lookups per token, while the
table is M·2^B·G·g products per token, which is cheap only for small codebooks. On one AVX512 core
(tests/benchmarks: benchmarks/inference.py) 2x8 codes at 4096x4096 run ~0.7x dense float32 at batch
1 (a lookup costs about as much as streaming four float32 weights) and 1.5-2x faster than dense at
batch 16; they are always much faster than the slab path they replace.

Declines to the format's slab/table kernel (`casp.quant.aqlm.aqlm_cpu_matmul`) on the rules of
`casp.nn.cpu_kernels` (x not float32 or needing a gradient, more than `MAX_TOKENS` rows, fewer than
`MIN_WEIGHTS` weights, no AVX2/AVX512) and when codebooks have more than 2^8 entries (the tables
would outgrow the layer); to the generic path when the module has `cache_dequantized` set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from casp.nn import cpu_kernels as ck
from casp.quant.aqlm import AQLM_FORMAT, aqlm_cpu_matmul, unpack_aqlm_codes

MAX_CODEBOOK_BITS = 8
CHUNK_GROUPS = 16        # input groups per lookup table (M·2^B·16·T float32: 32 KB per token at 2x8)


@dataclass
class AQLMTables:
    """A layer's cached flat indices, one (out, chunk·M) int32 tensor per chunk of input groups."""

    key: tuple
    bounds: list[tuple[int, int]]      # [start, end) groups of each chunk
    indices: list[torch.Tensor]


def build_indices(module) -> AQLMTables | None:
    """The flat lookup indices (m·K + code)·chunk + j of an "aqlm" `PackedLinear` (None if B > 8)."""
    meta = module.meta
    bits, m_count = meta["codebook_bits"], meta["num_codebooks"]
    if bits > MAX_CODEBOOK_BITS:
        return None
    k_count = 1 << bits
    codes = unpack_aqlm_codes(module.codes, meta).to(torch.int32)        # (out, G, M)
    groups = codes.shape[1]
    bounds = [(s, min(s + CHUNK_GROUPS, groups)) for s in range(0, groups, CHUNK_GROUPS)]
    indices = []
    for s, e in bounds:
        width = e - s
        base = (torch.arange(m_count, dtype=torch.int32) * (k_count * width)
                + torch.arange(width, dtype=torch.int32)[:, None])                  # (width, M)
        indices.append((codes[:, s:e] * width + base).reshape(codes.shape[0], -1).contiguous())
    return AQLMTables(ck.buffers_key(module), bounds, indices)


def lut_matmul(module, tables: AQLMTables, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b (float32) by chunked lookup tables; x (…, in_features) float32."""
    meta = module.meta
    n, k, g = module.out_features, module.in_features, meta["group_size"]
    xs = x.reshape(-1, k)
    tokens = xs.shape[0]
    groups = tables.bounds[-1][1]
    if groups * g != k:
        xs = F.pad(xs, (0, groups * g - k))
    xt = xs.view(tokens, groups, g).permute(2, 1, 0).contiguous()               # (g, G, T)
    books = module.codebooks.float().reshape(-1, g)                                # (M·K, g)
    y = None
    for (s, e), idx in zip(tables.bounds, tables.indices):
        lut = (books @ xt[:, s:e].reshape(g, -1)).view(-1, tokens)               # ((m·K + k)·chunk + j, T)
        part = F.embedding_bag(idx, lut, mode="sum")                               # (out, T)
        y = part if y is None else y.add_(part)
    y = y.t().contiguous().mul_(module.scales.float())
    if module.bias is not None:
        y.add_(module.bias.float())
    return y.view(*x.shape[:-1], n)


def aqlm_fast_cpu_matmul(module, x: torch.Tensor) -> torch.Tensor | None:
    """y = x Wᵀ + b for an "aqlm" `PackedLinear` on CPU by lookup tables, else the format's own kernel."""
    if module.cache_dequantized:
        return None
    if not ck.declines(module, x):
        tables = ck.cached_layout(module, build_indices)
        if tables is not None:
            return lut_matmul(module, tables, x)
    return aqlm_cpu_matmul(module, x)


AQLM_FORMAT.kernels["cpu"] = aqlm_fast_cpu_matmul
