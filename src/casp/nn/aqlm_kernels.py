"""Small-batch CPU matmul for the additive-codebook format ("aqlm") by lookup tables and embedding_bag.

`aqlm_fast_cpu_matmul` is the format's CPU kernel, declared where the format is defined (`casp.quant.aqlm`).

Method: y_r = s_r · Σ_{grp, m} x_grp · C_m[b_{r,grp,m}]. The input groups are cut into chunks of
`CHUNK_GROUPS`; chunk c's lookup table L_c[(m·K + k)·16 + j, t] = x_t,grp_j · C_m[k] is a float32
matmul (M·K × g)·(g × 16·T), 32 KB per token at 2x8, so it stays in cache while it is read.
`F.embedding_bag(mode="sum")` then sums, for every output row, its 16·M looked-up rows of L_c
(T values each): a fused, multi-threaded gather-sum in torch. At batch 1 (tables and partial sums
≤ `ONE_CALL_BYTES`) all tables come from one batched matmul and all chunks go through one
embedding_bag call (bags chunk-major), fewer parallel regions; above, chunk by chunk. Then the row
scales and the bias. The flat int32 indices of every code are built once, at first use, and cached
on the module (32 bits per code, i.e. 8 bits per weight at 2x8 g8, 4× the stored codes; never
stored, dropped on `.to()`, loading and `clear_cache`).

Accuracy: everything is float32; only the order of the sums differs from dequantize-then-matmul.
Elementwise, with u = 2^-24, G groups of g inputs and M codebooks (the reference's own rounding
included),
    |y - x·Ŵᵀ - b| ≤ (G·(g + M) + g + 4)·u · |s_r| · Σ_i |x_i| · Σ_m |C_m[b_{r,i,m}]_i|.
Measured ‖Δy‖/‖y‖ ≈ 3e-7 to 1e-6.

Speed (benchmarks/inference.py, one AVX512 core): the work is out·G·M table reads per token. At
2x8 a read costs about as much as streaming four float32 weights, so batch 1 runs at 0.85-0.95x
dense float32 on LLaMA-7B shapes, batch 16 at 1.6-1.9x; SmolLM2 shapes, whose dense weights fit
in cache, at 0.3-0.65x. It is 4-10x faster than the slab / table kernel it replaces. The table is
M·2^B·G·g products per token: codebooks above 2^8 entries (AQLM's 1x16) would cost more than the
layer, so they decline.

Declines to the format's slab/table kernel (`casp.quant.aqlm.aqlm_cpu_matmul`) on the rules of
`casp.nn.cpu_kernels` (x not float32 or needing a gradient, more than `MAX_TOKENS` rows, fewer than
`MIN_WEIGHTS` weights, no AVX2/AVX512) and when codebooks have more than 2^8 entries; to the generic
path when the module has `cache_dequantized` set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from casp.nn import cpu_kernels as ck
from casp.quant.aqlm import aqlm_cpu_matmul, unpack_aqlm_codes

MAX_CODEBOOK_BITS = 8
CHUNK_GROUPS = 16              # input groups per lookup table (M·2^B·16·T float32: 32 KB per token at 2x8)
ONE_CALL_BYTES = 8 << 20       # tables + per-chunk partial sums up to this size: one embedding_bag call


@dataclass
class AQLMTables:
    """A layer's cached flat indices: (chunks·out, CHUNK_GROUPS·M) int32, chunk-major; row c·out + r
    holds output row r's indices into chunk c's table, offset by c·M·2^B·CHUNK_GROUPS."""

    key: tuple
    chunks: int
    indices: torch.Tensor


def build_indices(module) -> AQLMTables | None:
    """The flat lookup indices of an "aqlm" `PackedLinear` (None if B > 8). Input groups are padded to
    whole chunks with code 0 (their table rows are 0: x is zero-padded)."""
    meta = module.meta
    bits, m_count = meta["codebook_bits"], meta["num_codebooks"]
    if bits > MAX_CODEBOOK_BITS:
        return None
    k_count, width = 1 << bits, CHUNK_GROUPS
    codes = unpack_aqlm_codes(module.codes, meta).to(torch.int32)        # (out, G, M)
    n, groups = codes.shape[:2]
    chunks = -(-groups // width)
    codes = F.pad(codes, (0, 0, 0, chunks * width - groups)).view(n, chunks, width, m_count)
    offset = (torch.arange(chunks, dtype=torch.int32).view(-1, 1, 1) * (m_count * k_count * width)
              + torch.arange(m_count, dtype=torch.int32) * (k_count * width)
              + torch.arange(width, dtype=torch.int32)[:, None])                    # (chunks, width, M)
    indices = (codes.transpose(0, 1) * width + offset[:, None]).reshape(chunks * n, width * m_count)
    return AQLMTables(ck.buffers_key(module), chunks, indices.contiguous())


def lut_matmul(module, tables: AQLMTables, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b (float32) by chunked lookup tables; x (…, in_features) float32.

    Small problems (tables and partial sums ≤ `ONE_CALL_BYTES`, e.g. batch 1) make all tables in one
    batched matmul and sum them in one embedding_bag call (bags chunk-major, so each chunk's table is
    read while it is in cache); larger ones make each chunk's table just before its embedding_bag
    (the chunk's offset taken off its indices, a cheap pass next to T lookups per index).
    """
    meta = module.meta
    n, k, g = module.out_features, module.in_features, meta["group_size"]
    chunks, idx = tables.chunks, tables.indices
    xs = x.reshape(-1, k)
    tokens = xs.shape[0]
    if chunks * CHUNK_GROUPS * g != k:
        xs = F.pad(xs, (0, chunks * CHUNK_GROUPS * g - k))
    xt = xs.view(tokens, chunks, CHUNK_GROUPS, g).permute(1, 3, 2, 0).reshape(chunks, g, -1)  # (c, g, j·T)
    books = module.codebooks.float().reshape(-1, g)                                          # (M·K, g)
    if 4 * tokens * (books.shape[0] * CHUNK_GROUPS + n) * chunks <= ONE_CALL_BYTES:
        lut = torch.matmul(books, xt).view(-1, tokens)
        y = F.embedding_bag(idx, lut, mode="sum").view(chunks, n, tokens).sum(0)
    else:
        rows = books.shape[0] * CHUNK_GROUPS
        y = None
        for c in range(chunks):
            lut = (books @ xt[c]).view(-1, tokens)
            part = F.embedding_bag(idx[c * n:(c + 1) * n] - c * rows, lut, mode="sum")
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

