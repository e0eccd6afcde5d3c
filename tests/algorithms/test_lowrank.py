import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casp.algorithms import lowrank
from casp.nn.lowrank_linear import LowRankLinear
from casp.algorithms.lowrank import (
    auto_ranks,
    check_rank,
    dropped_energy,
    factor_input_xtx,
    plain_lowrank,
    rank_for_ratio,
    whitened_lowrank,
    whitened_singular_values,
    whitening_factor,
)


def correlated_inputs(tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    return (torch.randn(tokens, n, generator=g) @ mix.T).double()


def out_err(w, w2, x):
    return float(((w.double() - w2.double()) @ x.T).norm())


# ---------------------------------------------------------------- whitening


def test_whitening_factor_pd():
    x = correlated_inputs(200, 12)
    xtx = x.T @ x
    s = whitening_factor(xtx)
    assert s.dtype == torch.float64
    assert torch.equal(s, s.tril())
    assert torch.allclose(s @ s.T, xtx, rtol=1e-10, atol=1e-10)


def test_whitening_factor_dead_inputs_and_few_tokens():
    x = correlated_inputs(5, 10)  # rank 5 < 10 features
    x[:, 3] = 0.0                 # a dead input
    xtx = x.T @ x
    s = whitening_factor(xtx)
    assert torch.isfinite(s).all() and torch.equal(s, s.tril())
    assert s.diagonal().gt(0).all()
    shift = (s @ s.T - xtx)
    # only the diagonal moved, by a small amount relative to the data
    assert torch.allclose(shift - torch.diag(shift.diagonal()), torch.zeros_like(shift), atol=1e-8)
    assert float(shift.diagonal().max()) < 1e-4 * float(xtx.diagonal().mean()) + 1e-8
    # all inputs dead
    s0 = whitening_factor(torch.zeros(4, 4))
    assert torch.isfinite(s0).all() and s0.diagonal().gt(0).all()


def test_whitening_factor_rejects_bad_input():
    with pytest.raises(ValueError):
        whitening_factor(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        whitening_factor(torch.full((2, 2), float("nan")))


# ---------------------------------------------------------------- factorisation


@pytest.mark.parametrize("m,n", [(12, 12), (6, 12), (16, 10)])
def test_full_rank_reconstruction(m, n):
    w = torch.randn(m, n)
    x = correlated_inputs(100, n)
    a, b = whitened_lowrank(w, x.T @ x, min(m, n))
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == (m, min(m, n)) and b.shape == (min(m, n), n)
    assert out_err(w, a @ b, x) <= 1e-4 * out_err(w, torch.zeros_like(w), x)


def test_full_rank_reconstruction_singular_xtx():
    w = torch.randn(8, 10)
    x = correlated_inputs(4, 10)
    x[:, 0] = 0
    a, b = whitened_lowrank(w, x.T @ x, 8)
    assert torch.allclose(a @ b, w, atol=1e-3)


def test_whitened_beats_plain_on_correlated_inputs():
    torch.manual_seed(1)
    w = torch.randn(24, 32)
    x = correlated_inputs(400, 32, seed=2)
    xtx = x.T @ x
    for r in (2, 6, 12):
        aw, bw = whitened_lowrank(w, xtx, r)
        ap, bp = plain_lowrank(w, r)
        ew, ep = out_err(w, aw @ bw, x), out_err(w, ap @ bp, x)
        assert ew < ep
        # the whitened error is exactly the dropped whitened energy (Eckart–Young)
        sv = whitened_singular_values(w, xtx)
        assert math.isclose(ew**2, dropped_energy(sv, r), rel_tol=1e-4)


def test_plain_lowrank_is_frobenius_optimal():
    w = torch.randn(10, 7)
    a, b = plain_lowrank(w, 3)
    sv = torch.linalg.svdvals(w.double())
    assert math.isclose(float((w - a @ b).double().norm() ** 2), dropped_energy(sv, 3), rel_tol=1e-4)


def test_gqa_k_shapes_and_bias_path():
    hidden, heads, kv, hd = 32, 4, 2, 8
    x = correlated_inputs(64, hidden)
    wk = torch.randn(kv * hd, hidden)   # fewer rows than W_q: nothing special
    bias = torch.randn(kv * hd)
    r = rank_for_ratio(kv * hd, hidden, 0.5)
    a, b = whitened_lowrank(wk, x.T @ x, r)
    assert a.shape == (kv * hd, r) and b.shape == (r, hidden)
    mod = LowRankLinear.from_factors(a, b, bias)
    y = mod(x.float())
    assert y.shape == (64, kv * hd)
    assert torch.allclose(y, x.float() @ (a @ b).T + bias, atol=1e-4)


def test_factor_input_xtx():
    x = correlated_inputs(50, 9)
    b = torch.randn(4, 9)
    got = factor_input_xtx(b, x.T @ x)
    h = x @ b.double().T
    assert got.dtype == torch.float64
    assert torch.allclose(got, h.T @ h, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        factor_input_xtx(b, torch.eye(8))


def test_shape_errors():
    with pytest.raises(ValueError):
        whitened_lowrank(torch.randn(4, 5), torch.eye(4), 2)
    with pytest.raises(ValueError):
        whitened_lowrank(torch.randn(4, 5), torch.eye(5), 5)
    with pytest.raises(ValueError):
        plain_lowrank(torch.randn(4, 5), -1)


# ---------------------------------------------------------------- rank rules


def test_rank_for_ratio():
    assert rank_for_ratio(4096, 4096, 0.25) == 512
    assert rank_for_ratio(5120, 5120, 0.25) == 640
    assert rank_for_ratio(4096, 4096, 0.5) == 1024
    assert rank_for_ratio(8, 8, 0.0) == 0
    assert rank_for_ratio(8, 8, 1e-6) == 1
    assert rank_for_ratio(128, 896, 0.25) == math.floor(0.25 * 128 * 896 / 1024)
    assert rank_for_ratio(7, 3, 1.0) <= 3


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_rank_for_ratio_rejects(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(8, 8, ratio)


def test_check_rank():
    check_rank(4, 6, 0)
    check_rank(4, 6, 4)
    for bad in (-1, 5, 2.0):
        with pytest.raises(ValueError):
            check_rank(4, 6, bad)
    with pytest.raises(ValueError):
        rank_for_ratio(0, 6, 0.5)


# ---------------------------------------------------------------- auto ranks


def brute_force(spectra, shapes, weights, budget, min_rank=0):
    best = None
    ranges = [range(min(min_rank, len(s)), len(s) + 1) for s in spectra]
    for ranks in itertools.product(*ranges):
        if sum(r * (m + n) for r, (m, n) in zip(ranks, shapes)) > budget:
            continue
        val = objective(spectra, weights, ranks)
        best = val if best is None else min(best, val)
    return best


def objective(spectra, weights, ranks):
    return sum(w * dropped_energy(s, r) for s, w, r in zip(spectra, weights, ranks))


@st.composite
def rank_problems(draw, equal_costs=False):
    k = draw(st.integers(1, 3))
    shapes, spectra, weights = [], [], []
    base = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    for _ in range(k):
        m, n = base if equal_costs else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        vals = draw(st.lists(st.floats(0, 10), min_size=min(m, n), max_size=min(m, n)))
        shapes.append((m, n))
        spectra.append(torch.tensor(sorted(vals, reverse=True), dtype=torch.float64))
        weights.append(draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])) if draw(st.booleans())
                       else draw(st.floats(0, 5)))
    total = sum(len(s) * (m + n) for s, (m, n) in zip(spectra, shapes))
    budget = draw(st.integers(0, total + 3))
    return spectra, shapes, weights, budget


def _check_against_brute_force(problem, min_rank=0):
    spectra, shapes, weights, budget = problem
    need = sum(min(min_rank, len(s)) * (m + n) for s, (m, n) in zip(spectra, shapes))
    if need > budget:
        with pytest.raises(ValueError):
            auto_ranks(spectra, shapes, weights, budget, min_rank=min_rank)
        return
    ranks = auto_ranks(spectra, shapes, weights, budget, min_rank=min_rank)
    assert sum(r * (m + n) for r, (m, n) in zip(ranks, shapes)) <= budget
    assert all(min(min_rank, len(s)) <= r <= len(s) for r, s in zip(ranks, spectra))
    best = brute_force(spectra, shapes, weights, budget, min_rank)
    assert objective(spectra, weights, ranks) <= best + 1e-9 * (1 + best)


@settings(max_examples=150, deadline=None)
@given(rank_problems())
def test_auto_ranks_optimal_vs_brute_force(problem):
    _check_against_brute_force(problem)


@settings(max_examples=60, deadline=None)
@given(rank_problems(), st.integers(0, 2))
def test_auto_ranks_min_rank_vs_brute_force(problem, min_rank):
    _check_against_brute_force(problem, min_rank)


@settings(max_examples=60, deadline=None)
@given(rank_problems(equal_costs=True))
def test_greedy_fallback_optimal_for_equal_costs(problem):
    old = lowrank._ENUM_LIMIT
    lowrank._ENUM_LIMIT = 0  # force greedy: exact when all matrices cost the same
    try:
        _check_against_brute_force(problem)
    finally:
        lowrank._ENUM_LIMIT = old


def test_greedy_can_lose_with_unequal_costs_but_auto_ranks_does_not():
    # rank of A: gain 100 for 10 params; ranks of B: gain 27 each for 3 params; budget 12.
    # Greedy by gain per parameter takes A (ratio 10 > 9) and is stuck at 100; 4 ranks of B give 108.
    shapes = [(5, 5), (1, 2), (1, 2), (1, 2), (1, 2)]
    spectra = [torch.tensor([10.0])] + [torch.tensor([27.0**0.5])] * 4
    weights = [1.0] * 5
    ranks = auto_ranks(spectra, shapes, weights, 12)
    assert ranks == [0, 1, 1, 1, 1]
    old = lowrank._ENUM_LIMIT
    lowrank._ENUM_LIMIT = 0
    try:
        assert auto_ranks(spectra, shapes, weights, 12) == [1, 0, 0, 0, 0]
    finally:
        lowrank._ENUM_LIMIT = old


def test_auto_ranks_weights_steer_ranks_and_validation():
    sv = torch.linspace(3, 1, 8)
    ranks = auto_ranks([sv, sv], [(8, 8), (8, 8)], [1.0, 4.0], 8 * 16)
    assert ranks[1] > ranks[0] and sum(ranks) == 8
    with pytest.raises(ValueError):
        auto_ranks([sv], [(8, 8)], [1.0, 2.0], 10)
    with pytest.raises(ValueError):
        auto_ranks([sv], [(8, 8)], [-1.0], 10)
    with pytest.raises(ValueError):
        auto_ranks([sv], [(4, 4)], [1.0], 10)
    with pytest.raises(ValueError):
        auto_ranks([sv], [(8, 8)], [1.0], -1)
    with pytest.raises(ValueError):
        auto_ranks([sv], [(8, 8)], [1.0], 10, min_rank=1)
