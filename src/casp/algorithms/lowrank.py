"""CASP step 1: data-aware (whitened) low-rank factors for W_q and W_k, and how to pick ranks.

The factorisation minimises the error of the layer's *outputs* on calibration data,
‖(W − AB)Xᵀ‖_F, rather than ‖W − AB‖_F. With S lower-triangular and S Sᵀ = XᵀX,
‖(W − W′)Xᵀ‖_F = ‖(W − W′)S‖_F, so the best rank-r W′ is the truncated SVD of W·S mapped back
by S⁻¹ (Eckart–Young in the whitened space). The dropped energy is the sum of the squared
singular values of W·S past r, which is what `auto_ranks` trades off between matrices.

Everything here is plain tensors in, tensors out; the module that holds the two factors is
`casp.nn.lowrank_linear.LowRankLinear`.
Biases (Qwen2 has q/k biases) stay on the output side; GQA only means W_k has fewer rows;
RoPE acts after the projection and is not touched.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, product

import torch

log = logging.getLogger(__name__)

__all__ = [
    "whitening_factor",
    "whitened_lowrank",
    "whitened_svd",
    "WhitenedSVD",
    "plain_lowrank",
    "whitened_singular_values",
    "dropped_energy",
    "rank_for_ratio",
    "check_rank",
    "auto_ranks",
    "factor_input_xtx",
]


# --------------------------------------------------------------------------------------------
# whitening and factorisation


def whitening_factor(xtx: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Lower-triangular S (float64) with S Sᵀ = XᵀX, so that ‖M Xᵀ‖_F = ‖M S‖_F.

    XᵀX is singular when some inputs are dead (always zero) or when there are fewer calibration
    tokens than features. Then the diagonal is shifted by (−λ_min + eps·mean diag), which makes
    the matrix positive definite while changing the objective by a relative ~eps, and the
    Cholesky factorisation is retried (with a growing shift if rounding still defeats it).
    """
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be a square matrix, got shape {tuple(xtx.shape)}")
    h = xtx.detach().to(torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError("xtx contains NaN or Inf")
    h = 0.5 * (h + h.T)
    s, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return s
    n = h.shape[0]
    scale = float(h.diagonal().abs().mean()) if n else 0.0
    scale = scale if scale > 0 else 1.0  # all inputs dead: any positive shift works
    lam_min = float(torch.linalg.eigvalsh(h)[0])
    shift = max(-lam_min, 0.0) + eps * scale
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for _ in range(8):
        s, info = torch.linalg.cholesky_ex(h + shift * eye)
        if int(info) == 0:
            log.debug("whitening: xtx not positive definite, diagonal shifted by %.3g", shift)
            return s
        shift *= 10.0
    raise ValueError("could not make xtx positive definite for whitening")


def whitened_singular_values(weight: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of W·S: σ_{r+1}² + … is the output error at rank r."""
    _check_weight_xtx(weight, xtx)
    s = whitening_factor(xtx)
    return torch.linalg.svdvals(weight.detach().to(torch.float64) @ s)


def dropped_energy(spectrum: torch.Tensor, rank: int) -> float:
    """Σ_{i>rank} σ_i²: the squared error a rank-`rank` truncation leaves (whitened or plain)."""
    return float((spectrum.to(torch.float64)[rank:] ** 2).sum())


@dataclass(frozen=True)
class WhitenedSVD:
    """W·S = U Σ Vᵀ with S Sᵀ = XᵀX (all float64): every rank's whitened factors come from one decomposition."""

    s: torch.Tensor
    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A = U_r √Σ_r (m×r) and B = √Σ_r V_rᵀ S⁻¹ (r×n), float32 (a triangular solve, no inverse)."""
        check_rank(self.u.shape[0], self.vh.shape[1], rank)
        root = self.sigma[:rank].sqrt()
        a = self.u[:, :rank] * root
        b = torch.linalg.solve_triangular(self.s, root[:, None] * self.vh[:rank], upper=False, left=False)
        return a.to(torch.float32), b.to(torch.float32)


def whitened_svd(weight: torch.Tensor, xtx: torch.Tensor) -> WhitenedSVD:
    """The whitened decomposition of W on inputs with second moment XᵀX (`WhitenedSVD`)."""
    _check_weight_xtx(weight, xtx)
    s = whitening_factor(xtx)
    u, sigma, vh = torch.linalg.svd(weight.detach().to(torch.float64) @ s, full_matrices=False)
    return WhitenedSVD(s, u, sigma, vh)


def whitened_lowrank(
    weight: torch.Tensor, xtx: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A (m×r), B (r×n), float32, with W ≈ A·B minimising ‖(W − AB)Xᵀ‖_F.

    SVD of W·S = U Σ Vᵀ; A = U_r √Σ_r and B = √Σ_r V_rᵀ S⁻¹. Splitting √Σ between the factors keeps
    their scales balanced for the quantizer. Several ranks of one matrix: `whitened_svd(...).factors(r)`.
    """
    check_rank(weight.shape[0], weight.shape[1], rank)
    return whitened_svd(weight, xtx).factors(rank)


def plain_lowrank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unwhitened truncated SVD (minimises ‖W − AB‖_F): the baseline the whitening must beat."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    check_rank(m, n, rank)
    u, sigma, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = sigma[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float32), (root[:, None] * vh[:rank]).to(torch.float32)


def factor_input_xtx(b: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """B XᵀX Bᵀ: the second moment of the `up` factor's input Bx, for quantizing `up` with GPTQ."""
    if b.ndim != 2 or xtx.shape != (b.shape[1], b.shape[1]):
        raise ValueError(f"B {tuple(b.shape)} and xtx {tuple(xtx.shape)} do not match")
    b64 = b.detach().to(torch.float64)
    out = b64 @ xtx.detach().to(torch.float64) @ b64.T
    return (0.5 * (out + out.T)).to(xtx.dtype)


def _check_weight_xtx(weight: torch.Tensor, xtx: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if tuple(xtx.shape) != (n, n):
        raise ValueError(f"xtx must be {n}×{n} for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(xtx.shape)}")


# --------------------------------------------------------------------------------------------
# rank rules


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank whose factors hold `ratio` of the m·n parameters: ⌊ratio·m·n/(m+n)⌋ (≥1 if ratio>0).

    This is the released CASP rule (ratio 0.25 gives r = 512 for a 4096×4096 matrix).
    """
    _check_shape(m, n)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (fraction of W's parameters kept by the factors), "
                         f"got {ratio}")
    if ratio == 0:
        return 0
    r = math.floor(ratio * m * n / (m + n) + 1e-9)
    return max(1, min(r, min(m, n)))


def check_rank(m: int, n: int, rank: int) -> None:
    """Raise ValueError unless 0 ≤ rank ≤ min(m, n) for an m×n matrix."""
    _check_shape(m, n)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    if rank < 0 or rank > min(m, n):
        raise ValueError(f"rank {rank} is outside [0, {min(m, n)}] for a {m}×{n} matrix")


def _check_shape(m: int, n: int) -> None:
    for v in (m, n):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"matrix dimensions must be positive ints, got {m!r}×{n!r}")


# --------------------------------------------------------------------------------------------
# automatic per-matrix ranks under a parameter budget

_ENUM_LIMIT = 2_000_000  # largest joint search over cost classes before falling back to greedy


def auto_ranks(
    spectra: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    weights: Sequence[float],
    param_budget: int,
    min_rank: int = 0,
) -> list[int]:
    """Ranks r_i minimising Σ_i weight_i·Σ_{j>r_i} σ_ij² subject to Σ_i r_i(m_i+n_i) ≤ budget.

    Rank j of matrix i gains weight_i·σ_ij² for a cost of m_i+n_i parameters; the gains fall
    with j (σ is sorted), so within a group of matrices with the *same* cost the best r ranks
    are simply the r largest gains (greedy is exact there). Across groups with different costs
    the problem is an integer knapsack, where greedy by gain per parameter can be beaten; we
    therefore search the split of the budget between cost groups exactly (for W_q/W_k there are
    at most two groups: GQA gives W_k fewer rows). With more groups than the search allows,
    greedy by gain per parameter is used and a debug note is logged.
    """
    k = len(spectra)
    if not (len(shapes) == len(weights) == k):
        raise ValueError("spectra, shapes and weights must have the same length")
    if isinstance(param_budget, bool) or not isinstance(param_budget, int) or param_budget < 0:
        raise ValueError(f"param_budget must be a non-negative int, got {param_budget!r}")
    costs, gains = [], []
    for (m, n), sv, w in zip(shapes, spectra, weights):
        _check_shape(m, n)
        sv = torch.as_tensor(sv).detach().to(torch.float64).flatten()
        if sv.numel() > min(m, n):
            raise ValueError(f"{sv.numel()} singular values for a {m}×{n} matrix")
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(f"weights must be finite and non-negative, got {w!r}")
        if not torch.isfinite(sv).all():
            raise ValueError("spectra must be finite")
        sv = sv.abs().sort(descending=True).values
        costs.append(m + n)
        gains.append((float(w) * sv**2).tolist())
    floor = [min(min_rank, len(g)) for g in gains]
    fixed = sum(f * c for f, c in zip(floor, costs))
    if fixed > param_budget:
        raise ValueError(f"param_budget {param_budget} is below the {fixed} parameters that "
                         f"min_rank={min_rank} already needs")
    budget = param_budget - fixed

    # cost groups: the optional gains of each group, merged and sorted (ties keep prefix order)
    groups: dict[int, list[tuple[float, int, int]]] = {}
    for i, (g, c) in enumerate(zip(gains, costs)):
        items = groups.setdefault(c, [])
        items.extend((g[j], i, j) for j in range(floor[i], len(g)))
    group_costs = sorted(groups)
    for c in group_costs:
        groups[c].sort(key=lambda t: (-t[0], t[1], t[2]))
    counts = _split_budget(group_costs, groups, budget)

    ranks = list(floor)
    if counts is None:
        log.debug("auto_ranks: %d cost groups, using greedy by gain per parameter", len(groups))
        ranks = _greedy(gains, costs, floor, budget)
    else:
        for c, cnt in zip(group_costs, counts):
            for _, i, _ in groups[c][:cnt]:
                ranks[i] += 1
    return ranks


def _split_budget(group_costs, groups, budget):
    """Exact best number of ranks per cost group (None when the joint search is too large)."""
    if not group_costs:
        return []
    prefix = [list(accumulate((t[0] for t in groups[c]), initial=0.0)) for c in group_costs]
    maxes = [min(len(groups[c]), budget // c) for c in group_costs]
    head = maxes[:-1]
    if math.prod(m + 1 for m in head) > _ENUM_LIMIT:
        return None
    last_c, last_p, last_max = group_costs[-1], prefix[-1], maxes[-1]
    best_val, best = -1.0, None
    for combo in product(*(range(m + 1) for m in head)):
        used = sum(cnt * c for cnt, c in zip(combo, group_costs))
        if used > budget:
            continue
        cnt_last = min(last_max, (budget - used) // last_c)
        val = sum(p[cnt] for p, cnt in zip(prefix, combo)) + last_p[cnt_last]
        if val > best_val:
            best_val, best = val, (*combo, cnt_last)
    return list(best)


def _greedy(gains, costs, floor, budget):
    """Greedy by gain per parameter; a matrix whose next rank does not fit stops growing."""
    ranks = list(floor)
    open_ = {i for i in range(len(gains)) if ranks[i] < len(gains[i])}
    while open_:
        i = max(open_, key=lambda j: (gains[j][ranks[j]] / costs[j], -j))
        if costs[i] > budget:
            open_.discard(i)
            continue
        budget -= costs[i]
        ranks[i] += 1
        if ranks[i] == len(gains[i]):
            open_.discard(i)
    return ranks
