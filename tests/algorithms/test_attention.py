import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casp.algorithms.attention import (
    AttentionErrorStats,
    DensityAccumulator,
    attention_error_stats,
    attention_map_error,
    attention_probs,
    density,
    entrywise_bound,
    explicit_bound,
    first_order_error,
    key_validity,
    perturbation_bound,
    row_density,
    row_l1_error,
)


def qk(b=2, t=9, h=4, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, h, d, generator=g), torch.randn(b, t, kv, d, generator=g)


# ---------------------------------------------------------------- maps


def test_attention_probs_matches_reference_with_gqa():
    q, k = qk()
    p = attention_probs(q, k)
    assert p.shape == (2, 4, 9, 9) and p.dtype == torch.float32
    kr = k.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(p, scores.softmax(-1), atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 9))
    # heads 0 and 1 share kv head 0
    p_single = attention_probs(q[:, :, :1], k[:, :, :1])
    assert torch.allclose(p[:, :1], p_single, atol=1e-6)


def test_attention_probs_padding_and_noncausal():
    q, k = qk(t=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    p = attention_probs(q, k, causal=False, mask=mask)
    assert torch.all(p[0, :, :, :2] == 0)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 6))
    pc = attention_probs(q, k, causal=True, mask=mask)
    assert torch.all(pc[0, :, :2] == 0)  # padded queries at the start see no key: all-zero rows
    assert torch.allclose(pc[0, :, 2:].sum(-1), torch.ones(4, 4))


def test_key_validity_alignment_and_errors():
    v = key_validity(2, 5, causal=True)
    assert v.shape == (1, 1, 2, 5)
    assert v[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    with pytest.raises(ValueError):
        key_validity(5, 2)
    with pytest.raises(ValueError):
        key_validity(3, 3, mask=torch.ones(1, 4))


def test_key_validity_sliding_window():
    v = key_validity(5, 5, window=2)[0, 0]  # each query sees itself and the key before it
    want = [[j in (i - 1, i) for j in range(5)] for i in range(5)]
    assert v.tolist() == want
    v = key_validity(2, 5, window=3)[0, 0]  # queries sit at key positions 3 and 4
    assert v.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    assert torch.equal(key_validity(4, 4, window=4), key_validity(4, 4))
    mask = torch.tensor([[False, True, True, True, True]])
    assert not key_validity(5, 5, mask=mask, window=2)[0, 0, 1, 0]
    with pytest.raises(ValueError):
        key_validity(3, 3, window=0)


def test_window_and_scale_reach_the_maps_and_the_error_stats():
    q, k = qk(t=8)
    p = attention_probs(q, k, scale=0.3, window=3)
    kr = k.repeat_interleave(2, dim=2)
    z = torch.einsum("bqhd,bkhd->bhqk", q, kr) * 0.3
    far = ~key_validity(8, 8, window=3)
    assert torch.allclose(p, z.masked_fill(far, float("-inf")).softmax(-1), atol=1e-6)
    g = torch.Generator().manual_seed(5)
    q2, k2 = q + 0.2 * torch.randn(q.shape, generator=g), k + 0.2 * torch.randn(k.shape, generator=g)
    s = attention_error_stats(q, k, q2, k2, scale=0.3, window=3)
    p2 = attention_probs(q2, k2, scale=0.3, window=3)
    assert math.isclose(s.mse, attention_map_error(p, p2), rel_tol=1e-4)
    assert torch.allclose(s.head_density(), density(p, valid=~far), atol=1e-6)
    assert s.mean_row_l1 <= s.mean_row_l1_bound


# ---------------------------------------------------------------- density


def test_density_uniform_map_is_mass_fraction():
    n = 20
    p = torch.full((1, 3, 5, n), 1.0 / n)
    assert torch.allclose(density(p, 0.9, causal=False), torch.full((3,), 0.9, dtype=torch.float64))
    assert torch.allclose(density(p, 0.5, causal=False), torch.full((3,), 0.5, dtype=torch.float64))
    p7 = torch.full((1, 1, 2, 7), 1.0 / 7)  # ceil(0.9·7) = 7 keys
    assert torch.allclose(density(p7, 0.9, causal=False), torch.ones(1, dtype=torch.float64))


def test_density_one_hot_is_one_over_keys():
    t = 6
    p = torch.zeros(1, 2, t, t)
    p[..., 0] = 1.0  # every row attends only to the first key
    rd = row_density(p)  # causal: row i may see i+1 keys
    expect = 1.0 / torch.arange(1, t + 1, dtype=torch.float64)
    assert torch.allclose(rd[0, 0], expect)
    assert torch.allclose(density(p), expect.mean().repeat(2))
    assert torch.allclose(density(p, causal=False), torch.full((2,), 1.0 / t, dtype=torch.float64))


def test_density_sparser_map_is_lower_and_mask_respected():
    q, k = qk(t=12)
    hot = attention_probs(q * 6, k)
    cool = attention_probs(q * 0.1, k)
    assert torch.all(density(hot) < density(cool))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, :4] = False
    valid = key_validity(12, 12, True, mask)
    p = attention_probs(q, k, causal=True, mask=mask)
    rd = row_density(p, valid=valid)
    assert torch.isnan(rd[:, :, :4]).all() and not torch.isnan(rd[:, :, 4:]).any()
    assert torch.all(rd[:, :, 4] == 1.0)  # first real query sees one key
    with pytest.raises(ValueError):
        density(p, mass=0.0)


def test_density_accumulator_streams_means():
    acc = DensityAccumulator(mass=0.9)
    maps = [attention_probs(*qk(b=1, t=8, seed=s)) for s in range(3)]
    for m in maps:
        acc.add(0, m)
    acc.add(3, maps[0])
    want = density(torch.cat(maps))
    assert torch.allclose(acc.head_density(0), want)
    assert acc.layers() == [0, 3]
    assert acc.as_tensor().shape == (2, 4)
    assert math.isclose(acc.layer_density(0), float(want.mean()), rel_tol=1e-9)
    assert torch.all(acc.head_keys(0) >= 1)
    held = [v for v in vars(acc).values() if isinstance(v, dict)]
    assert all(t.numel() == 4 for d in held for t in d.values())  # no maps kept
    with pytest.raises(ValueError):
        acc.add(0, maps[0][:, :2])


# ---------------------------------------------------------------- measured errors


def test_map_errors():
    p = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    p2 = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    assert math.isclose(attention_map_error(p, p2), 0.5 / 4)
    assert math.isclose(row_l1_error(p, p2), 0.5)
    assert math.isclose(row_l1_error(p, p2, rows=torch.tensor([[[True, False]]])), 1.0)
    with pytest.raises(ValueError):
        attention_map_error(p, p2[..., :1])


# ---------------------------------------------------------------- our bound


def exact(z, delta, valid):
    """Exact float64 maps of logits z and z+δ restricted to the valid keys."""
    inf = torch.tensor(float("-inf"), dtype=torch.float64)
    p = torch.where(valid, z, inf).softmax(-1)
    p2 = torch.where(valid, z + delta, inf).softmax(-1)
    return p, p2


@st.composite
def rows_and_perturbations(draw):
    r = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    zscale = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0, 10.0, 40.0]))
    dscale = draw(st.sampled_from([1e-6, 1e-3, 0.05, 0.3, 1.0, 3.0, 10.0, 60.0]))
    z = torch.randn(r, n, generator=g, dtype=torch.float64) * zscale
    kind = draw(st.sampled_from(["plain", "one_hot", "few_keys", "heavy_tail"]))
    if kind == "one_hot":  # near-one-hot rows: one key far above the rest
        z[:, 0] += draw(st.sampled_from([5.0, 20.0, 50.0, 200.0]))
    elif kind == "few_keys" and n > 2:
        z[:, :2] += 15.0
    if kind == "heavy_tail":
        spread = torch.exp(2 * torch.randn(r, n, generator=g, dtype=torch.float64))
        delta = torch.randn(r, n, generator=g, dtype=torch.float64) * spread * dscale
    else:
        delta = torch.randn(r, n, generator=g, dtype=torch.float64) * dscale
    if draw(st.booleans()):
        delta = delta + draw(st.floats(-100, 100))  # a per-row constant shift changes nothing
    valid = torch.rand(r, n, generator=g) < draw(st.sampled_from([1.0, 0.7, 0.3]))
    valid[:, 0] = True
    return z, delta, valid


@settings(max_examples=200, deadline=None)
@given(rows_and_perturbations())
def test_bound_holds(case):
    z, delta, valid = case
    p, p2 = exact(z, delta, valid)
    diff = (p2 - p).abs()
    tol = 1e-12
    u = entrywise_bound(p, delta, valid)
    assert torch.all(diff <= u + tol)
    b1 = perturbation_bound(p, delta, valid, norm="l1")
    b2 = perturbation_bound(p, delta, valid, norm="l2")
    assert b1.shape == (z.shape[0],)
    assert torch.all(diff.sum(-1) <= b1 + tol)
    assert torch.all(diff.norm(dim=-1) <= b2 + tol)
    assert torch.all(b1 <= 2.0) and torch.all(b2 <= math.sqrt(2.0) + 1e-12)
    # the readable form is looser than Σu but still a bound
    assert torch.all(u.sum(-1) <= explicit_bound(p, delta, valid) * (1 + 1e-9) + tol)


@settings(max_examples=150, deadline=None)
@given(rows_and_perturbations(), st.sampled_from([0.5, 0.8, 0.9, 0.99]))
def test_density_corollary_holds(case, mass):
    """E_p|δ − E_pδ| ≤ P(K)·w_K + 2(1 − P(K))·range(δ) for the `mass` set K of the row."""
    z, delta, valid = case
    p, _ = exact(z, delta, valid)
    mad = first_order_error(p, delta, valid)
    for i in range(p.shape[0]):
        v = valid[i]
        pi, di = p[i][v], delta[i][v]
        order = pi.argsort(descending=True)
        cum = pi[order].cumsum(0)
        k = int((cum < mass * (1 - 1e-12)).sum()) + 1
        kset = order[:k]
        pk = float(pi[kset].sum())
        wk = float(di[kset].max() - di[kset].min())
        rng = float(di.max() - di.min())
        assert float(mad[i]) <= pk * wk + 2 * (1 - pk) * rng + 1e-9 * (1 + rng)


def test_bound_is_tight_to_first_order():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2
    delta = torch.randn(6, 30, generator=g, dtype=torch.float64) * 1e-4
    valid = torch.ones(6, 30, dtype=torch.bool)
    p, p2 = exact(z, delta, valid)
    measured = (p2 - p).abs().sum(-1)
    b1 = perturbation_bound(p, delta)
    assert torch.allclose(b1, measured, rtol=1e-3)
    assert torch.allclose(first_order_error(p, delta), measured, rtol=1e-3)
    b2 = perturbation_bound(p, delta, norm="l2")
    assert torch.all(b2 <= 1.01 * (p2 - p).norm(dim=-1) * 3)  # same order as the measured l2


def test_one_hot_rows_have_zero_bound_and_sparser_rows_smaller_bound():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    delta = torch.tensor([[0.3, -2.0, 5.0, 1.0]], dtype=torch.float64)
    assert float(perturbation_bound(p, delta)) == 0.0
    assert float(perturbation_bound(p, delta, norm="l2")) == 0.0
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(200, 50, generator=g, dtype=torch.float64) * 0.2
    base = torch.randn(200, 50, generator=g, dtype=torch.float64)
    means = [float(perturbation_bound((base * s).softmax(-1), delta).mean()) for s in (0.5, 2, 8)]
    assert means[0] > means[1] > means[2]


def test_bound_rejects_bad_input():
    p = torch.tensor([[0.5, 0.5]])
    with pytest.raises(ValueError):
        perturbation_bound(p, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError):
        perturbation_bound(p, torch.zeros(1, 2), norm="linf")


# ---------------------------------------------------------------- layer level


@pytest.mark.parametrize("masked", [False, True])
def test_attention_error_stats_measured_and_bounded(masked):
    q, k = qk(b=2, t=10, h=4, kv=2, d=8, seed=3)
    g = torch.Generator().manual_seed(4)
    q2 = q + 0.2 * torch.randn(q.shape, generator=g)
    k2 = k + 0.2 * torch.randn(k.shape, generator=g)
    mask = None
    if masked:
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[1, :3] = False
    s = attention_error_stats(q, k, q2, k2, mask=mask)
    p = attention_probs(q.double(), k.double(), mask=mask)
    p2 = attention_probs(q2.double(), k2.double(), mask=mask)
    rows = torch.ones(2, 1, 10, dtype=torch.bool)
    if masked:
        rows[1, :, :3] = False
    assert s.rows == int(rows.sum()) and s.entries == s.rows * 10
    sel = rows.expand(2, 4, 10)
    want_mse = float(((p - p2).double() ** 2)[sel].mean())
    assert math.isclose(s.mse, want_mse, rel_tol=1e-4)
    if not masked:
        assert math.isclose(s.mse, attention_map_error(p, p2), rel_tol=1e-4)
    assert math.isclose(s.mean_row_l1, row_l1_error(p, p2, rows), rel_tol=1e-4)
    assert s.mse <= s.mse_bound and s.mean_row_l1 <= s.mean_row_l1_bound
    assert torch.all(s.head_mse() <= s.head_mse_bound())
    assert torch.all(s.l1 <= s.l1_bound)
    valid = key_validity(10, 10, True, mask)
    assert torch.allclose(s.head_density(), density(p, valid=valid), atol=1e-9)
    assert s.mean_row_l1_first_order <= s.mean_row_l1_bound
    both = s + s
    assert math.isclose(both.mse, s.mse) and both.rows == 2 * s.rows
    assert (AttentionErrorStats() + s) is s
    same = attention_error_stats(q, k, q, k, mask=mask)
    assert same.mse == 0.0 and same.mean_row_l1_bound == 0.0


def test_density_accepts_2d_valid():
    p = attention_probs(*qk(t=7))
    v = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.allclose(density(p, valid=v), density(p))


def test_error_stats_split_over_batch_rows_give_the_same_figures(monkeypatch):
    """The statistics are made in chunks of batch rows (to bound memory); the chunking changes nothing."""
    from casp.algorithms import attention as attn

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 48, 4, 16, generator=g), torch.randn(5, 48, 2, 16, generator=g)
    q2, k2 = q + 0.1 * torch.randn(q.shape, generator=g), k + 0.1 * torch.randn(k.shape, generator=g)
    mask = torch.ones(5, 48, dtype=torch.bool)
    mask[3, :7] = False
    whole = attn.attention_error_stats(q, k, q2, k2, mask=mask)
    monkeypatch.setattr(attn, "MAP_ELEMENTS", 4 * 48 * 48)
    split = attn.attention_error_stats(q, k, q2, k2, mask=mask)
    for name in ("mse", "mse_bound", "mean_row_l1", "mean_row_l1_bound"):
        assert getattr(split, name) == pytest.approx(getattr(whole, name), rel=1e-12)
    assert torch.allclose(split.head_density(), whole.head_density(), rtol=1e-12)


def _split_reference(probs, kind, mass):
    """Row by row: density among image keys and among text keys, and the image mass share, for text queries."""
    b, h, t, _ = probs.shape
    sums = torch.zeros(3, h, dtype=torch.float64)
    rows = torch.zeros(h)
    for bi in range(b):
        for hi in range(h):
            for qi in range(t):
                if kind[bi, qi]:
                    continue
                seen = torch.arange(t) <= qi
                groups = [seen & kind[bi], seen & ~kind[bi]]
                if not all(g.any() for g in groups):
                    continue
                rows[hi] += 1
                for gi, g in enumerate(groups):
                    p = probs[bi, hi, qi][g].double()
                    cum = p.sort(descending=True).values.cumsum(0)
                    needed = min(int((cum < mass * p.sum() * (1 - 1e-6)).sum()) + 1, int(g.sum()))
                    sums[gi, hi] += needed / int(g.sum())
                sums[2, hi] += probs[bi, hi, qi][groups[0]].double().sum()
    return sums / rows, rows


def test_split_density_matches_a_row_by_row_reference():
    from casp.algorithms.attention import SplitDensity

    g = torch.Generator().manual_seed(0)
    b, h, t = 2, 3, 9
    q, k = torch.randn(b, t, h, 8, generator=g), torch.randn(b, t, h, 8, generator=g)
    probs = attention_probs(q, k)
    kind = torch.zeros(b, t, dtype=torch.bool)
    kind[0, 1:5] = True   # an image after one text token
    kind[1, 2:4] = True
    acc = SplitDensity(mass=0.8)
    acc.add(probs[:1], kind[:1])
    acc.add(probs[1:], kind[1:])
    want, rows = _split_reference(probs, kind, 0.8)
    assert acc.rows == int(rows[0]) == (9 - 5) + (9 - 4)
    for i, name in enumerate(("kind", "rest", "share")):
        torch.testing.assert_close(acc.per_head(name), want[i])


def test_split_density_sees_sparse_image_attention():
    from casp.algorithms.attention import SplitDensity

    t = 12
    kind = torch.zeros(1, t, dtype=torch.bool)
    kind[0, 1:9] = True
    logits = torch.zeros(1, 1, t, t)
    logits[..., 4] = 8.0          # every text query looks at one image token, and evenly at the text tokens
    probs = torch.softmax(logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")), -1)
    acc = SplitDensity(mass=0.9)
    acc.add(probs, kind)
    assert float(acc.per_head("kind")) == pytest.approx(1 / 8)
    assert float(acc.per_head("rest")) > 0.8
    assert float(acc.per_head("share")) > 0.9
