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


AQLM_FORMAT.kernels["cpu"] = aqlm_fast_cpu_matmul
