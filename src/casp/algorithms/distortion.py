"""How much a weight error costs: the Fisher-weighted output distortion the allocator minimises."""
from __future__ import annotations

import torch


def weighted_distortion(delta: torch.Tensor, xtx: torch.Tensor, fisher: torch.Tensor | None = None,
                        lift: torch.Tensor | None = None) -> float:
    """Σ_o F_o (L Δ H Δᵀ Lᵀ)_oo, in float64.

    Δ (m×n) is the weight error, H = XᵀX of its input, F (m, or the lifted size) the per-output
    Fisher weights (all ones when None). `lift` L maps a low-rank down factor's output error onto
    the projection's output (L = up factor), so factor errors are priced where the loss sees them.
    Computes on Δ's device (F is moved there).
    """
    d = delta.double()
    cross = d @ xtx.double()
    if lift is not None:
        l = lift.double()
        per_row = ((l @ cross) * (l @ d)).sum(1)
    else:
        per_row = (cross * d).sum(1)
    w = fisher.double().to(per_row.device) if fisher is not None else torch.ones_like(per_row)
    return float((w * per_row).sum())
