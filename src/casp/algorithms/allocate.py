"""Bit allocation: choose one quantizer setting per unit so the model meets a target average bit-width.

A *unit* is what gets one setting: a matrix, or a whole decoder layer. Each unit offers candidate
settings with an exact stored cost in bits (codes + scales + zeros) and, for the rate-distortion
allocator, a measured distortion. The budget is counted over the weights the model had *before*
low-rank Q/K, so the bits saved by the factors pay for upgrades elsewhere (CASP's accounting).

Two allocators:

* `allocate_paper` -- the rule the released CASP scripts hard-code (Q/K factors, first layers and the
  last layer get the next wider setting), made budget-aware so it never exceeds the target.
* `allocate_rd` -- ours: minimise total distortion under the budget, a multiple-choice knapsack solved
  by dynamic programming over (rounded-up) cost or by a Lagrangian relaxation.

Every allocator returns total_bits <= budget, or raises `InfeasibleBudget` when even the cheapest
setting everywhere is over budget. See docs/allocation.md for the maths.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FACTOR_KINDS = frozenset({"q_factor", "k_factor"})
SOLVERS = ("dp", "lagrange", "best")


@dataclass
class Unit:
    """One quantized unit: its original weight count, and the cost/distortion of each candidate key."""

    name: str
    num_weights: int
    cost_bits: dict[str, int]
    distortion: dict[str, float] = field(default_factory=dict)
    layer_index: int | None = None
    kind: str = ""


@dataclass
class Allocation:
    """The chosen key per unit and the bit accounting of that choice.

    `average_bits` counts the allocated bits only (total_bits / original weights);
    `overall_average_bits` adds the fixed, non-allocated bits and is what compares to the target.
    """

    choice: dict[str, str]
    total_bits: int
    budget_bits: int
    average_bits: float
    method: str
    fixed_bits: int = 0
    distortion: float | None = None
    num_weights: int = 0

    @property
    def overall_average_bits(self) -> float:
        return (self.total_bits + self.fixed_bits) / self.num_weights if self.num_weights else 0.0


class InfeasibleBudget(ValueError):
    """The target is below what the cheapest setting of every unit already costs."""

    def __init__(self, target_bits: float, min_average: float, fixed_bits: int = 0):
        self.target_bits = target_bits
        self.min_average = min_average
        extra = f", plus {fixed_bits} fixed bits" if fixed_bits else ""
        shown = math.ceil(min_average * 1000 - 1e-9) / 1000  # rounded up: the message stays true
        super().__init__(
            f"target {_fmt_target(target_bits)} bits is below the minimum feasible average "
            f"{shown:.3f} bits (every unit at its cheapest setting{extra})"
        )


# --------------------------------------------------------------------------------------------------
# validation and accounting


def _fmt_target(t: float) -> str:
    return f"{t:.2f}" if abs(t - round(t, 2)) < 1e-12 else f"{t:.6g}"


def _check_units(units: Sequence[Unit], need_distortion: bool = False) -> list[Unit]:
    """Validate units and return them sorted by name, so results do not depend on input order."""
    if not units:
        raise ValueError("no units to allocate")
    seen: set[str] = set()
    for u in units:
        if u.name in seen:
            raise ValueError(f"duplicate unit name {u.name!r}")
        seen.add(u.name)
        if isinstance(u.num_weights, bool) or not isinstance(u.num_weights, (int, np.integer)) \
                or u.num_weights < 0:
            raise ValueError(f"unit {u.name!r}: num_weights must be a non-negative int")
        if not u.cost_bits:
            raise ValueError(f"unit {u.name!r} has no candidates")
        for k, c in u.cost_bits.items():
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
                raise ValueError(f"unit {u.name!r}, candidate {k!r}: cost must be a non-negative int")
        if need_distortion:
            for k in u.cost_bits:
                if k not in u.distortion:
                    raise ValueError(f"unit {u.name!r}: missing distortion for candidate {k!r}")
                if not math.isfinite(float(u.distortion[k])):
                    raise ValueError(f"unit {u.name!r}, candidate {k!r}: distortion is not finite")
            unknown = set(u.distortion) - set(u.cost_bits)
            if unknown:
                raise ValueError(f"unit {u.name!r}: distortion for unknown candidates {sorted(unknown)}")
    if sum(int(u.num_weights) for u in units) <= 0:
        raise ValueError("units hold no weights")
    return sorted(units, key=lambda u: u.name)


def _ladder(u: Unit) -> list[str]:
    """Keys ordered by (cost, key): index 0 is the cheapest setting, deterministic on ties."""
    return sorted(u.cost_bits, key=lambda k: (u.cost_bits[k], k))


def _total_weights(units: Iterable[Unit]) -> int:
    return sum(int(u.num_weights) for u in units)


def budget_bits(units: Sequence[Unit], target_bits: float, fixed_bits: int = 0) -> int:
    """Bits the allocated units may use: floor(target x original weights) - fixed_bits (exact)."""
    units = _check_units(units)
    if not math.isfinite(target_bits):
        raise ValueError(f"target_bits must be finite, got {target_bits}")
    # the decimal the caller wrote (shortest repr), so 0.3 x 10 weights is 3 bits, not 2
    return math.floor(Fraction(repr(float(target_bits))) * _total_weights(units)) - int(fixed_bits)


def min_feasible_average(units: Sequence[Unit], fixed_bits: int = 0) -> float:
    """Average bits per original weight with every unit at its cheapest setting (fixed bits included)."""
    units = _check_units(units)
    return (sum(min(u.cost_bits.values()) for u in units) + int(fixed_bits)) / _total_weights(units)


def _budget_or_raise(units: list[Unit], target_bits: float, fixed_bits: int) -> int:
    budget = budget_bits(units, target_bits, fixed_bits)
    if sum(min(u.cost_bits.values()) for u in units) > budget:
        raise InfeasibleBudget(target_bits, min_feasible_average(units, fixed_bits), fixed_bits)
    return budget


def _result(units: list[Unit], choice: dict[str, str], budget: int, method: str,
            fixed_bits: int) -> Allocation:
    total = sum(u.cost_bits[choice[u.name]] for u in units)
    if total > budget:  # a bug, never a user error: every allocator is built to stay within budget
        raise RuntimeError(f"{method}: allocation uses {total} bits over the budget {budget}")
    dist = None
    if all(choice[u.name] in u.distortion for u in units):
        dist = float(sum(u.distortion[choice[u.name]] for u in units))
    return Allocation(choice=choice, total_bits=int(total), budget_bits=int(budget),
                      average_bits=total / _total_weights(units), method=method,
                      fixed_bits=int(fixed_bits), distortion=dist,
                      num_weights=_total_weights(units))


# --------------------------------------------------------------------------------------------------
# the paper's allocation, as released


def paper_priority(units: Sequence[Unit], layer_count: int) -> list[list[Unit]]:
    """Upgrade groups in priority order: each Q/K factor unit, then layers 0, L-1, 1, 2, ..., L-2.

    A layer group holds that layer's non-factor units (the released scripts set a whole layer at
    once). Units with no layer index come last, one group each, by name.
    """
    if layer_count < 1:
        raise ValueError(f"layer_count must be >= 1, got {layer_count}")
    for u in units:
        if u.layer_index is not None and not 0 <= u.layer_index < layer_count:
            raise ValueError(f"unit {u.name!r}: layer_index {u.layer_index} outside [0, {layer_count})")
    big = layer_count
    factors = sorted((u for u in units if u.kind in FACTOR_KINDS),
                     key=lambda u: (big if u.layer_index is None else u.layer_index, u.name))
    order = [0] + ([layer_count - 1] if layer_count > 1 else []) + list(range(1, layer_count - 1))
    by_layer: dict[int, list[Unit]] = {}
    loose: list[Unit] = []
    for u in units:
        if u.kind in FACTOR_KINDS:
            continue
        if u.layer_index is None:
            loose.append(u)
        else:
            by_layer.setdefault(u.layer_index, []).append(u)
    groups = [[u] for u in factors]
    groups += [sorted(by_layer[i], key=lambda u: u.name) for i in order if i in by_layer]
    groups += [[u] for u in sorted(loose, key=lambda u: u.name)]
    return groups


def allocate_paper(units: Sequence[Unit], target_bits: float, layer_count: int,
                   fixed_bits: int = 0) -> Allocation:
    """The released CASP rule made budget-aware: factors, then first/last layers, move up one rung.

    Start with every unit at its cheapest candidate. Each round walks `paper_priority` and moves
    every unit of a group to its next more expensive candidate when the whole group's extra cost
    fits in what is left of the budget (a group that does not fit is skipped: first fit). Rounds
    repeat, climbing further rungs, until one round changes nothing. With equal-size layers and
    two candidates this gives exactly the released lists' shape: all factors, then layers
    0, L-1, 1, 2, ... -- as many as the target pays for. Distortion is not used.
    """
    units = _check_units(units)
    groups = paper_priority(units, layer_count)
    budget = _budget_or_raise(units, target_bits, fixed_bits)
    ladders = {u.name: _dedup_costs(u, _ladder(u)) for u in units}
    rung = {u.name: 0 for u in units}
    left = budget - sum(u.cost_bits[ladders[u.name][0]] for u in units)
    rounds = 0
    while True:
        moved = False
        for group in groups:
            movable = [u for u in group if rung[u.name] + 1 < len(ladders[u.name])]
            if not movable:
                continue
            delta = sum(u.cost_bits[ladders[u.name][rung[u.name] + 1]]
                        - u.cost_bits[ladders[u.name][rung[u.name]]] for u in movable)
            if delta <= left:
                for u in movable:
                    rung[u.name] += 1
                left -= delta
                moved = True
        rounds += 1
        if not moved:
            break
    logger.debug("allocate_paper: %d rounds, %d bits left", rounds, left)
    choice = {u.name: ladders[u.name][rung[u.name]] for u in units}
    return _result(units, choice, budget, "paper", fixed_bits)


def _dedup_costs(u: Unit, ladder: list[str]) -> list[str]:
    """Keep one key per distinct cost: moving to an equally expensive setting is not an upgrade."""
    out: list[str] = []
    for k in ladder:
        if not out or u.cost_bits[k] > u.cost_bits[out[-1]]:
            out.append(k)
    return out


# --------------------------------------------------------------------------------------------------
# rate-distortion allocation (multiple-choice knapsack)


def default_dp_bins(n_units: int) -> int:
    """Cost bins for the DP: 256 per unit (budget loss < 1/256 of the slack), within [4096, 2**17]."""
    return int(min(max(256 * (n_units + 1), 4096), 1 << 17))


def _solve_dp(units: list[Unit], budget: int, bins: int) -> dict[str, str]:
    """Exact DP over costs quantised by rounding up; never over budget (see docs/allocation.md).

    Costs are taken above each unit's cheapest setting and divided by their gcd (lossless); if the
    slack still exceeds `bins`, they are divided by w = ceil(slack / bins) and rounded up. The bits
    rounding leaves unused are then spent by the same greedy fill as the Lagrangian solver.
    """
    if bins < 1:
        raise ValueError(f"dp_bins must be >= 1, got {bins}")
    keys = [_ladder(u) for u in units]
    base = [u.cost_bits[k[0]] for u, k in zip(units, keys)]
    extra = [[u.cost_bits[k] - b for k in ks] for u, ks, b in zip(units, keys, base)]
    slack = budget - sum(base)
    g = 0
    for row in extra:
        for e in row:
            g = math.gcd(g, e)
    g = g or 1
    slack_g = slack // g  # floor: an allocation within slack_g units of g is within slack
    w = max(1, -(-slack_g // bins))
    cap = slack_g // w
    logger.debug("dp: %d units, slack %d bits, gcd %d, bin width %d, capacity %d",
                 len(units), slack, g, w, cap)
    value = np.zeros(cap + 1)
    kmax = max(len(k) for k in keys)
    argtab = np.zeros((len(units), cap + 1), dtype=np.int8 if kmax < 128 else np.int32)
    qcosts: list[list[int]] = []
    for i, u in enumerate(units):
        q = [-(-(e // g) // w) for e in extra[i]]  # e is a multiple of g; ceil division by w
        qcosts.append(q)
        cand = np.full((len(q), cap + 1), np.inf)
        for j, (qj, key) in enumerate(zip(q, keys[i])):
            if qj <= cap:
                cand[j, qj:] = value[: cap + 1 - qj] + float(u.distortion[key])
        best = np.argmin(cand, axis=0)  # first index on ties: the cheaper setting
        argtab[i] = best
        value = cand[best, np.arange(cap + 1)]
    choice: dict[str, str] = {}
    c = cap
    for i in range(len(units) - 1, -1, -1):
        j = int(argtab[i, c])
        choice[units[i].name] = keys[i][j]
        c -= qcosts[i][j]
    if w == 1:
        return choice  # exact: nothing was rounded, the DP optimum cannot be improved
    left = budget - sum(u.cost_bits[choice[u.name]] for u in units)
    return _greedy_fill(units, choice, left)  # spend what rounding up left unused


def _hull(u: Unit) -> list[str]:
    """Lower convex hull of (cost, distortion), from the cheapest point down to the least distortion.

    Along the returned keys cost rises and distortion falls, and the gain per bit strictly falls.
    """
    pts = sorted(u.cost_bits, key=lambda k: (u.cost_bits[k], u.distortion[k], k))
    hull: list[str] = []
    for k in pts:
        c, d = u.cost_bits[k], float(u.distortion[k])
        if hull and (c == u.cost_bits[hull[-1]] or d >= u.distortion[hull[-1]]):
            continue  # same cost (worse) or not less distortion: dominated
        while len(hull) >= 2:
            c1, d1 = u.cost_bits[hull[-2]], float(u.distortion[hull[-2]])
            c2, d2 = u.cost_bits[hull[-1]], float(u.distortion[hull[-1]])
            # drop the middle point when it is on or above the chord from hull[-2] to k
            if (d2 - d1) * (c - c1) >= (d - d1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _solve_lagrange(units: list[Unit], budget: int) -> dict[str, str]:
    """Lagrangian relaxation on convex hulls, bisection over the breakpoints of λ, then greedy fill.

    For a multiplier λ each unit takes the hull point minimising distortion + λ·cost, i.e. every
    hull step whose gain (distortion saved per bit) exceeds λ. Cost falls as λ rises and only
    changes at the gains, so bisecting over the sorted gains finds the smallest feasible λ exactly.
    The leftover budget is then filled greedily with the best distortion-per-bit moves among all
    candidates (not only hull points).
    """
    hulls = [_hull(u) for u in units]
    gains: list[list[float]] = []
    for u, h in zip(units, hulls):
        gains.append([(u.distortion[a] - u.distortion[b]) / (u.cost_bits[b] - u.cost_bits[a])
                      for a, b in zip(h, h[1:])])

    def pick(lam: float) -> list[int]:
        return [sum(1 for x in gs if x > lam) for gs in gains]

    def cost(pos: list[int]) -> int:
        return sum(u.cost_bits[h[p]] for u, h, p in zip(units, hulls, pos))

    pos = pick(0.0)
    if cost(pos) > budget:
        lams = sorted({x for gs in gains for x in gs})  # cost(pick(lams[-1])) is the cheapest: fits
        lo, hi = 0, len(lams) - 1  # find the smallest index whose λ is feasible
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(pick(lams[mid])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        pos = pick(lams[lo])
    choice = {u.name: h[p] for u, h, p in zip(units, hulls, pos)}
    return _greedy_fill(units, choice, budget - cost(pos))


def _greedy_fill(units: list[Unit], choice: dict[str, str], left: int) -> dict[str, str]:
    """Spend leftover bits: repeatedly take the affordable move with the most distortion saved per bit."""
    for _ in range(4 * sum(len(u.cost_bits) for u in units)):  # each move lowers distortion; cap
        best = None
        for u in units:
            c0, d0 = u.cost_bits[choice[u.name]], float(u.distortion[choice[u.name]])
            for k in sorted(u.cost_bits):
                dc, dd = u.cost_bits[k] - c0, float(u.distortion[k]) - d0
                if dd >= 0 or dc > left:
                    continue
                # free or bit-saving moves first (largest saving), then by saving per bit
                score = (1, -dd, -dc) if dc <= 0 else (0, -dd / dc, -dd)
                if best is None or score > best[0]:
                    best = (score, u, k, dc)
        if best is None:
            break
        _, u, k, dc = best
        choice[u.name] = k
        left -= dc
    return choice


def allocate_rd(units: Sequence[Unit], target_bits: float, fixed_bits: int = 0,
                solver: str = "dp", dp_bins: int | None = None) -> Allocation:
    """Minimise total distortion subject to total cost <= budget (multiple-choice knapsack).

    solver "dp": DP over costs rounded up to `dp_bins` bins (default `default_dp_bins`): at least
    as good as the exact optimum for a budget smaller by less than (n_units + 1) bin widths, then
    greedy fill; exact when the slack (in units of the costs' gcd) fits the bins.
    "lagrange": convex-hull Lagrangian + greedy fill. "best": both, the lower total distortion
    (dp on ties).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    units = _check_units(units, need_distortion=True)
    budget = _budget_or_raise(units, target_bits, fixed_bits)
    bins = default_dp_bins(len(units)) if dp_bins is None else int(dp_bins)
    out: list[Allocation] = []
    if solver in ("dp", "best"):
        out.append(_result(units, _solve_dp(units, budget, bins), budget, "rd-dp", fixed_bits))
    if solver in ("lagrange", "best"):
        out.append(_result(units, _solve_lagrange(units, budget), budget, "rd-lagrange", fixed_bits))
    if solver != "best":
        return out[0]
    win = min(out, key=lambda a: a.distortion)  # min keeps the first (dp) on ties
    win.method = f"rd-best/{win.method.removeprefix('rd-')}"
    return win
