"""BlockLDLQ (QuIP#, Tseng et al. 2024, §4.1): adaptive rounding of W with a g-dimensional vector quantizer.

Proxy loss ℓ(Ŵ) = tr((Ŵ - W) H (Ŵ - W)ᵀ) with H = XᵀX (in × in, columns of W are inputs). With the
g-block LDL decomposition H = Lᵀ D L (L unit block-lower-triangular, D block-diagonal) and
A = Lᵀ - I (strictly block-upper), blocks of g columns are rounded first to last as

    Ŵ_k = Q(W_k + (W - Ŵ)_{<k} A_{<k,k}),

which makes (Ŵ - W) Lᵀ = η, the per-block rounding errors, so ℓ = Σ_k tr(η_k D_k η_kᵀ): each block
only pays for its own rounding error, weighted by its conditional second moment D_k. With g = 1 this
is LDLQ, which equals GPTQ.

`block_ldlq` applies the feedback lazily in buffers of columns (one matrix product per buffer);
`block_ldlq_reference` is the plain formula, recomputing the whole feedback sum for every block,
on an LDL computed by a different route (backward Schur complements). Tests check they agree.
"""
from __future__ import annotations

from typing import Callable

import torch

BlockQuantizer = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]  # target -> (codes, values)


def _check_blocks(n: int, block: int) -> int:
    if block < 1 or n % block:
        raise ValueError(f"dimension {n} is not a multiple of the block size {block}")
    return n // block


def block_ldl(h: torch.Tensor, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """H = Lᵀ D L with L (n × n) unit block-lower-triangular and D (n/block, block, block) block-diagonal.

    From the "reverse" Cholesky H = V Vᵀ, V upper (the Cholesky factor of H with indices reversed):
    with B_k the diagonal blocks of V, Lᵀ = V·blockdiag(B_k)⁻¹ and D_k = B_k B_kᵀ. H must be positive definite.
    """
    lt, d = _upper_factor_(h.clone(), block)
    return lt.T.contiguous(), d


def _upper_factor_(h: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Lᵀ, D) of `block_ldl` in H's own memory (H is overwritten by Lᵀ): one n × n temporary (the Cholesky
    factor) beside H, where an 11008² float64 H is 0.97 GB."""
    n = h.shape[0]
    nb = _check_blocks(n, block)
    _flip_(h)
    c = torch.linalg.cholesky(h)
    _flip_(c)
    v = h.mT.copy_(c)   # column-major, as the Cholesky factor is: the products below then round as they always have
    del c
    blocks = v.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
    binv = torch.linalg.solve_triangular(blocks, torch.eye(block, dtype=h.dtype, device=h.device).expand_as(blocks),
                                         upper=True)
    eye = torch.eye(block, dtype=h.dtype, device=h.device)
    for k in range(nb):   # Lᵀ = V·blockdiag(B_k)⁻¹, one column block at a time, in V's place
        s = slice(k * block, (k + 1) * block)
        v[:k * block, s] = v[:k * block, s] @ binv[k]
        v[s, s] = eye
    return v.triu_(), blocks @ blocks.transpose(1, 2)


def _flip_(x: torch.Tensor, piece: int = 256) -> None:
    """x.flip(0, 1) of a square matrix, in place, by swapping pieces of rows."""
    n = x.shape[0]
    half = n // 2
    for i in range(0, half, piece):
        e = min(i + piece, half)
        top = x[i:e].flip(0, 1)
        x[i:e] = x[n - e:n - i].flip(0, 1)
        x[n - e:n - i] = top
    if n % 2:
        x[half] = x[half].flip(0)


def block_ldl_reference(h: torch.Tensor, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The same decomposition by backward block Schur complements (slow, for tests)."""
    n = h.shape[0]
    nb = _check_blocks(n, block)
    h = h.clone()
    lt = torch.eye(n, dtype=h.dtype, device=h.device)
    d = torch.zeros(nb, block, block, dtype=h.dtype, device=h.device)
    for k in reversed(range(nb)):
        s, e = k * block, (k + 1) * block
        d[k] = h[s:e, s:e]
        u = torch.linalg.solve(d[k], h[s:e, :s]).T  # H_{<k,k} D_k⁻¹ (D_k symmetric)
        lt[:s, s:e] = u
        h[:s, :s] -= u @ d[k] @ u.T
    return lt.T.contiguous(), d


def feedback_matrix(h: torch.Tensor, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Lᵀ - I (strictly block-upper) and D of the block LDL of H."""
    return feedback_matrix_(h.clone(), block)


def feedback_matrix_(h: torch.Tensor, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """`feedback_matrix` in H's own memory: H is overwritten by A, which is returned (for a large H, whose
    copies are what a quantizer's peak memory is made of)."""
    a, d = _upper_factor_(h, block)
    for k in range(0, h.shape[0], block):
        a[k:k + block, k:k + block] = 0
    return a, d


def block_ldlq(w: torch.Tensor, h: torch.Tensor | None, quantize: BlockQuantizer, block: int = 8, buffer: int = 128,
               feedback: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round W (m × n) block by block with BlockLDLQ; H (n × n) positive definite (damp it first).

    `quantize(target (m, block)) -> (codes (m, …), values (m, block))` is the block quantizer.
    `feedback` (optional) is A = Lᵀ - I when the caller already has it; H is then not needed (None).
    Computes in w's dtype. Returns Ŵ (m × n) and the codes (m, n/block, …).
    """
    m, n = w.shape
    nb = _check_blocks(n, block)
    given = h if feedback is None else feedback
    if given is None or given.shape != (n, n):
        shape = None if given is None else tuple(given.shape)
        raise ValueError(f"{'H' if feedback is None else 'the feedback matrix'} has shape {shape}, expected {(n, n)}")
    a = (feedback if feedback is not None else feedback_matrix(h, block)[0]).to(w.dtype)
    buffer = max(block, buffer // block * block)
    work = w.clone()
    q = torch.empty_like(w)
    codes = None
    for c1 in range(0, n, buffer):
        c2 = min(c1 + buffer, n)
        err = torch.empty(m, c2 - c1, dtype=w.dtype, device=w.device)
        for k in range(c1, c2, block):
            j = k - c1
            target = work[:, k:k + block]
            if j:
                target = target + err[:, :j] @ a[c1:k, k:k + block]
            c, values = quantize(target)
            if codes is None:
                codes = torch.empty(m, nb, *c.shape[1:], dtype=c.dtype, device=c.device)
            codes[:, k // block] = c
            q[:, k:k + block] = values
            err[:, j:j + block] = w[:, k:k + block] - values
        if c2 < n:
            work[:, c2:].addmm_(err, a[c1:c2, c2:])
    return q, codes


def block_ldlq_reference(w: torch.Tensor, h: torch.Tensor, quantize: BlockQuantizer,
                         block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The unbuffered formula Ŵ_k = Q(W_k + (W - Ŵ)_{<k} A_{<k,k}) on `block_ldl_reference` (for tests)."""
    m, n = w.shape
    nb = _check_blocks(n, block)
    low, _ = block_ldl_reference(h, block)
    a = (low.T - torch.eye(n, dtype=h.dtype, device=h.device)).to(w.dtype)
    q = torch.zeros_like(w)
    codes = []
    for k in range(nb):
        s, e = k * block, (k + 1) * block
        c, values = quantize(w[:, s:e] + (w[:, :s] - q[:, :s]) @ a[:s, s:e])
        q[:, s:e] = values
        codes.append(c)
    return q, torch.stack(codes, 1)


def proxy_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64."""
    d = w.double() - q.double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))
