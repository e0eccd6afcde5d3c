"""Tests for casp.algorithms.allocate: budget accounting, the paper rule, the rate-distortion solvers."""
from __future__ import annotations

import itertools
import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casp.algorithms.allocate import (
    Allocation,
    InfeasibleBudget,
    Unit,
    allocate_paper,
    allocate_rd,
    budget_bits,
    default_dp_bins,
    min_feasible_average,
    paper_priority,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force(units: list[Unit], budget: int) -> float:
    """Least total distortion over every assignment within budget (inf when none fits)."""
    best = math.inf
    keys = [list(u.cost_bits) for u in units]
    for combo in itertools.product(*keys):
        cost = sum(u.cost_bits[k] for u, k in zip(units, combo))
        if cost <= budget:
            best = min(best, sum(u.distortion[k] for u, k in zip(units, combo)))
    return best


@st.composite
def unit_sets(draw, max_units: int = 8, max_cands: int = 4, small: bool = False):
    """Random units: sizes, monotone or arbitrary costs, arbitrary distortions, layer/kind tags."""
    n_units = draw(st.integers(1, max_units))
    n_cands = draw(st.integers(1, max_cands))
    monotone = draw(st.booleans())
    layer_count = draw(st.integers(1, 5))
    units = []
    for i in range(n_units):
        nw = draw(st.integers(1, 40 if small else 5000))
        costs = {}
        for b in range(1, n_cands + 1):
            if monotone:
                costs[f"{b}b"] = b * nw + draw(st.integers(0, nw))
            else:
                costs[f"{b}b"] = draw(st.integers(0, 6 * nw))
        dist = {k: draw(st.floats(0, 100, allow_nan=False)) for k in costs}
        kind = draw(st.sampled_from(["q_factor", "k_factor", "v", "mlp", "layer"]))
        li = draw(st.one_of(st.none(), st.integers(0, layer_count - 1)))
        units.append(Unit(f"u{i}", nw, costs, dist, layer_index=li, kind=kind))
    return units, layer_count


def run_all(units, target, layer_count, fixed=0, dp_bins=None):
    """Every allocator on one problem."""
    return [
        allocate_paper(units, target, layer_count, fixed),
        allocate_rd(units, target, fixed, solver="dp", dp_bins=dp_bins),
        allocate_rd(units, target, fixed, solver="lagrange"),
        allocate_rd(units, target, fixed, solver="best", dp_bins=dp_bins),
    ]


# --------------------------------------------------------------------------------------------------
# budget accounting


def test_budget_bits_is_floor_minus_fixed():
    units = [Unit("a", 7, {"x": 1}), Unit("b", 3, {"x": 1})]
    assert budget_bits(units, 2.0) == 20
    assert budget_bits(units, 2.15) == 21
    assert budget_bits(units, 2.15, fixed_bits=5) == 16
    assert budget_bits(units, 0.3) == 3  # the decimal written, not 2.999... in binary


def test_infeasible_message_and_type():
    units = [Unit("a", 600, {"lo": 1276, "hi": 2000}), Unit("b", 400, {"lo": 851})]
    assert min_feasible_average(units) == pytest.approx(2.127)
    with pytest.raises(InfeasibleBudget) as e:
        allocate_rd([Unit(u.name, u.num_weights, u.cost_bits, {k: 0.0 for k in u.cost_bits})
                     for u in units], 1.5)
    assert str(e.value) == ("target 1.50 bits is below the minimum feasible average 2.127 bits "
                            "(every unit at its cheapest setting)")
    assert isinstance(e.value, ValueError)
    with pytest.raises(InfeasibleBudget):
        allocate_paper(units, 2.126, layer_count=1)
    assert allocate_paper(units, 2.127, layer_count=1).total_bits == 2127


def test_fixed_bits_count_against_target():
    units = [Unit("a", 100, {"2b": 200, "3b": 300})]
    assert min_feasible_average(units, fixed_bits=50) == 2.5
    with pytest.raises(InfeasibleBudget, match="plus 50 fixed bits"):
        allocate_paper(units, 2.4, 1, fixed_bits=50)
    a = allocate_paper(units, 3.0, 1, fixed_bits=50)
    assert a.choice == {"a": "2b"} and a.budget_bits == 250
    assert a.average_bits == 2.0 and a.overall_average_bits == 2.5


def test_input_validation():
    good = Unit("a", 10, {"x": 10}, {"x": 1.0})
    with pytest.raises(ValueError, match="missing distortion"):
        allocate_rd([Unit("a", 10, {"x": 10, "y": 20}, {"x": 1.0})], 3.0)
    with pytest.raises(ValueError, match="duplicate"):
        allocate_rd([good, good], 3.0)
    with pytest.raises(ValueError, match="no units"):
        budget_bits([], 2.0)
    with pytest.raises(ValueError, match="unknown solver"):
        allocate_rd([good], 3.0, solver="magic")
    with pytest.raises(ValueError, match="layer_index"):
        allocate_paper([Unit("a", 10, {"x": 10}, layer_index=4)], 3.0, layer_count=4)
    with pytest.raises(ValueError, match="non-negative int"):
        allocate_paper([Unit("a", 10, {"x": 2.5})], 3.0, layer_count=1)


# --------------------------------------------------------------------------------------------------
# never over budget (property)


@SETTINGS
@given(data=unit_sets(), target=st.floats(0, 7), fixed=st.integers(0, 500),
       dp_bins=st.sampled_from([None, 1, 2, 7, 50]))
def test_never_over_budget(data, target, fixed, dp_bins):
    units, layer_count = data
    budget = budget_bits(units, target, fixed)
    cheapest = sum(min(u.cost_bits.values()) for u in units)
    if cheapest > budget:
        for call in (lambda: allocate_paper(units, target, layer_count, fixed),
                     lambda: allocate_rd(units, target, fixed, solver="dp", dp_bins=dp_bins),
                     lambda: allocate_rd(units, target, fixed, solver="lagrange"),
                     lambda: allocate_rd(units, target, fixed, solver="best", dp_bins=dp_bins)):
            with pytest.raises(InfeasibleBudget):
                call()
        assert target < min_feasible_average(units, fixed) + 1e-12
        return
    for a in run_all(units, target, layer_count, fixed, dp_bins):
        assert a.budget_bits == budget
        assert set(a.choice) == {u.name for u in units}
        total = sum(u.cost_bits[a.choice[u.name]] for u in units)
        assert a.total_bits == total <= budget
        assert a.overall_average_bits <= target + 1e-12


# --------------------------------------------------------------------------------------------------
# rate-distortion optimality


@SETTINGS
@given(data=unit_sets(max_units=6, max_cands=3, small=True), target=st.floats(0.5, 6))
def test_dp_matches_brute_force(data, target):
    units, _ = data
    budget = budget_bits(units, target)
    if sum(min(u.cost_bits.values()) for u in units) > budget:
        return
    best = brute_force(units, budget)
    dp = allocate_rd(units, target, solver="dp", dp_bins=10**6)  # rounding off: exact
    assert dp.distortion == pytest.approx(best, abs=1e-9)
    lag = allocate_rd(units, target, solver="lagrange")
    assert lag.total_bits <= budget and lag.distortion >= best - 1e-9
    both = allocate_rd(units, target, solver="best")
    assert both.distortion == pytest.approx(min(dp.distortion, lag.distortion), abs=1e-9)


@SETTINGS
@given(data=unit_sets(max_units=6, max_cands=3, small=True), target=st.floats(0.5, 6),
       bins=st.integers(1, 30))
def test_dp_rounding_gap_bound(data, target, bins):
    """Coarse DP is at least as good as the exact optimum at budget - (n+1)·g·w (docs/allocation.md)."""
    units, _ = data
    budget = budget_bits(units, target)
    base = sum(min(u.cost_bits.values()) for u in units)
    if base > budget:
        return
    g = 0
    for u in units:
        lo = min(u.cost_bits.values())
        for c in u.cost_bits.values():
            g = math.gcd(g, c - lo)
    g = g or 1
    w = max(1, -(-((budget - base) // g) // bins))
    dp = allocate_rd(units, target, solver="dp", dp_bins=bins)
    assert dp.distortion <= brute_force(units, budget - (len(units) + 1) * g * w) + 1e-9


def test_dp_picks_best_marginal_use():
    # two units, budget for one upgrade: it must go where it saves the most distortion
    units = [Unit("a", 100, {"2": 200, "3": 300}, {"2": 5.0, "3": 4.0}),
             Unit("b", 100, {"2": 200, "3": 300}, {"2": 9.0, "3": 1.0})]
    for solver in ("dp", "lagrange", "best"):
        a = allocate_rd(units, 2.5, solver=solver)
        assert a.choice == {"a": "2", "b": "3"} and a.distortion == 6.0


def test_lagrange_fill_uses_non_hull_points():
    # the hull jumps from 2b to 8b; only the fill can reach the affordable 3b
    u = Unit("a", 100, {"2b": 200, "3b": 300, "8b": 800}, {"2b": 10.0, "3b": 9.5, "8b": 0.0})
    a = allocate_rd([u], 3.0, solver="lagrange")
    assert a.choice == {"a": "3b"}


def test_three_hundred_units_is_fast_and_close():
    rng = random.Random(0)
    units = []
    for i in range(300):
        n = rng.randrange(10**5, 10**7)
        units.append(Unit(f"u{i:03d}", n,
                          {f"{b}b": b * n + rng.randrange(n // 10) for b in (2, 3, 4, 8)},
                          {f"{b}b": rng.random() * 4.0 ** -b for b in (2, 3, 4, 8)}))
    t0 = time.perf_counter()
    dp = allocate_rd(units, 2.5, solver="dp")
    elapsed = time.perf_counter() - t0
    lag = allocate_rd(units, 2.5, solver="lagrange")
    assert default_dp_bins(300) == 77056
    assert elapsed < 10.0  # ~0.6 s on one free core
    assert dp.total_bits <= dp.budget_bits and lag.total_bits <= lag.budget_bits
    assert dp.distortion <= 1.01 * lag.distortion and lag.distortion <= 1.01 * dp.distortion


# --------------------------------------------------------------------------------------------------
# the paper rule


def llama7b_units(rank: int = 512) -> list[Unit]:
    """LLaMA-7B-shaped units (d 4096, MLP 11008, 32 layers), low-rank Q/K, 2 or 3 bits, no overhead."""
    d, ff, units = 4096, 11008, []
    for i in range(32):
        for kind in ("q_factor", "k_factor"):
            stored = rank * 2 * d
            units.append(Unit(f"l{i:02d}.{kind}", d * d, {"2b": 2 * stored, "3b": 3 * stored},
                              layer_index=i, kind=kind))
        for kind, n in (("v", d * d), ("o", d * d), ("mlp", 3 * d * ff)):
            units.append(Unit(f"l{i:02d}.{kind}", n, {"2b": 2 * n, "3b": 3 * n},
                              layer_index=i, kind=kind))
    return units


def upgraded_layers(a: Allocation, units: list[Unit]) -> set[int]:
    return {u.layer_index for u in units if u.kind == "mlp" and a.choice[u.name] == "3b"}


def test_paper_reproduces_released_aqlm_shape():
    units = llama7b_units()
    a = allocate_paper(units, 2.0, layer_count=32)
    assert all(a.choice[u.name] == "3b" for u in units if u.kind in ("q_factor", "k_factor"))
    # the released AQLM list is layers 0-6 and 31 (2.001 bits); within 2.000 one layer fewer fits
    assert upgraded_layers(a, units) == {0, 1, 2, 3, 4, 5, 31}
    assert a.average_bits <= 2.0
    released = allocate_paper(units, 2.0015, layer_count=32)
    assert upgraded_layers(released, units) == {0, 1, 2, 3, 4, 5, 6, 31}
    # whole layers move together
    for i in upgraded_layers(a, units):
        assert {a.choice[f"l{i:02d}.{k}"] for k in ("v", "o", "mlp")} == {"3b"}


def test_paper_upgrades_factors_first():
    units = llama7b_units()
    factors = [u for u in units if u.kind in ("q_factor", "k_factor")]
    extra = sum(u.cost_bits["3b"] - u.cost_bits["2b"] for u in factors)
    n = sum(u.num_weights for u in units)
    base = sum(u.cost_bits["2b"] for u in units)
    a = allocate_paper(units, (base + extra + 0.5) / n, layer_count=32)
    assert all(a.choice[u.name] == "3b" for u in factors)
    assert all(a.choice[u.name] == "2b" for u in units if u not in factors)
    # half the factor upgrade: the earliest layers' factors go first
    a = allocate_paper(units, (base + extra // 2 + 0.5) / n, layer_count=32)
    up = sorted(u.layer_index for u in factors if a.choice[u.name] == "3b")
    assert up == sorted(list(range(16)) * 2)


def test_paper_priority_order_and_rounds():
    units = [Unit(f"L{i}", 10, {"a": 10, "b": 20, "c": 30}, layer_index=i, kind="layer")
             for i in range(4)]
    units.append(Unit("qf", 10, {"a": 1, "b": 2, "c": 3}, layer_index=2, kind="q_factor"))
    order = [[u.name for u in g] for g in paper_priority(units, 4)]
    assert order == [["qf"], ["L0"], ["L3"], ["L1"], ["L2"]]
    # 75 bits, cheapest 41. Round 1: factor +1, L0, L3, L1 +10 each (72), L2 does not fit;
    # round 2: the factor's next rung (+1) still fits (73)
    a = allocate_paper(units, 1.5, layer_count=4)
    assert a.choice == {"qf": "c", "L0": "b", "L3": "b", "L1": "b", "L2": "a"}
    assert a.total_bits == 73
    # 100 bits: round 1 takes everything (82), round 2 lifts the factor and L0 (93)
    a = allocate_paper(units, 2.0, layer_count=4)
    assert a.choice == {"qf": "c", "L0": "c", "L3": "b", "L1": "b", "L2": "b"}
    assert a.total_bits == 93


def test_paper_skips_equal_cost_settings():
    u = Unit("x", 10, {"a": 10, "a2": 10, "b": 20}, layer_index=0, kind="layer")
    assert allocate_paper([u], 2.0, 1).choice == {"x": "b"}


# --------------------------------------------------------------------------------------------------
# determinism and reporting


@settings(max_examples=30, deadline=None)
@given(data=unit_sets(), target=st.floats(1, 7), seed=st.integers(0, 100))
def test_deterministic_and_order_free(data, target, seed):
    units, layer_count = data
    if sum(min(u.cost_bits.values()) for u in units) > budget_bits(units, target):
        return
    shuffled = list(units)
    random.Random(seed).shuffle(shuffled)
    first = run_all(units, target, layer_count)
    again = run_all(units, target, layer_count)
    mixed = run_all(shuffled, target, layer_count)
    for a, b, c in zip(first, again, mixed):
        assert a == b == c
