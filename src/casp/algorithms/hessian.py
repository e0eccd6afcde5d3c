"""The proxy Hessian H = XᵀX made ready for a quantizer's rounding: one routine for GPTQ, BlockLDLQ (E8)
and the additive-codebook search.

Steps, in this order: a copy in `dtype` (rows and columns in the quantizer's visiting order when one is
given), symmetrised, dead inputs (H_jj = 0: they never fire) given H_jj = 1, the off-diagonal scaled
by (1 - shrink), then damp·mean(diag H)·I added. Each quantizer keeps its own choices: GPTQ works in
`--hessian-dtype` on the matrix as accumulated (no symmetrising) and damps inside its Cholesky, raising
the damping on failure; E8 and AQLM work on a symmetrised float64 copy.
"""
from __future__ import annotations

import torch


def shrink_off_diagonal_(h: torch.Tensor, shrink: float) -> torch.Tensor:
    """H's off-diagonal scaled by (1 - shrink) in place, its diagonal kept.

    The per-input energies stay; the cross-correlations of the calibration text (the part that
    moves most between domains) are trusted less.
    """
    if shrink:
        kept = h.diagonal().clone()
        h.mul_(1.0 - shrink).diagonal().copy_(kept)
    return h


def symmetrize_(h: torch.Tensor, piece: int = 256) -> torch.Tensor:
    """H ← (H + Hᵀ)/2 in place, by pieces of rows: no second n × n matrix (equal, bit for bit, to the copying
    formula: an entry already made symmetric is (s + s)/2 = s when its row comes round)."""
    n = h.shape[0]
    for i in range(0, n, piece):
        rows = slice(i, min(i + piece, n))
        part = (h[rows] + h[:, rows].T).mul_(0.5)
        h[rows] = part
        h[:, rows] = part.T
    return h


def prepare_hessian(h: torch.Tensor, damp: float | None, shrink: float = 0.0, *, dtype: torch.dtype = torch.float64,
                    symmetrize: bool = True, order: torch.Tensor | None = None) -> torch.Tensor:
    """A new (n × n) H in `dtype`, ready to factor; the caller's `h` is never changed.

    `order`: a permutation of the inputs, applied to rows and columns while copying (GPTQ's act order).
    `symmetrize`: replace H by (H + Hᵀ)/2. Dead inputs get H_jj = 1; `shrink` scales the off-diagonal
    by (1 - shrink); `damp` adds damp·mean(diag H)·I (None: left to the caller, as GPTQ does).
    """
    h = h.detach().to(dtype, copy=order is None)   # from here on the function's own copy
    if order is not None:
        h = h.index_select(0, order).index_select(1, order)
    if symmetrize:
        symmetrize_(h)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    shrink_off_diagonal_(h, shrink)
    if damp is not None:
        h.diagonal().add_(damp * float(h.diagonal().mean()))
    return h
