"""The E8P codebook, its exact encoder, the 1-bit E8 residual codebook and the matrix quantizer."""
import itertools

import pytest
import torch

from casp.algorithms.e8p import (
    NUM_CODES,
    e8_1bit_encode,
    e8_1bit_table,
    e8p_abs_table,
    e8p_codebook,
    e8p_decode,
    e8p_encode,
    quantize_matrix,
    rvq_decode,
    rvq_encode,
    stage_count,
)
from casp.algorithms.ldlq import proxy_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codebook():
    return e8p_codebook(torch.float64)


def _in_e8(y: torch.Tensor) -> torch.Tensor:
    """Rows of y in E8 = D8 ∪ (D8 + ½): all-integer or all-half-odd coordinates, even sum."""
    integer = (y == y.round()).all(1)
    half = ((y - 0.5) == (y - 0.5).round()).all(1)
    return (integer | half) & (y.sum(1).round() % 2 == 0)


def test_abs_table_is_the_d8hat_ball_plus_29_norm12_entries():
    table = e8p_abs_table(torch.float64)
    assert table.shape == (256, 8) and torch.unique(table, dim=0).shape[0] == 256
    # all x ∈ (Z+½)^8 with coordinates in ±{½, 3/2, 5/2} (enough for ‖x‖² ≤ 10) and an even sum
    vals = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], dtype=torch.float64)
    pts = torch.cartesian_prod(*[vals] * 8)
    pts = pts[(pts.sum(1).round() % 2 == 0) & ((pts * pts).sum(1) <= 10)]
    assert pts.shape[0] == 29056
    ball = torch.unique(pts.abs(), dim=0)
    assert torch.equal(ball, table[:227])  # lexicographic order, as torch.unique sorts
    pad = table[227:]
    assert torch.equal((pad * pad).sum(1), torch.full((29,), 12.0, dtype=torch.float64))
    assert bool(((pad == 0.5).sum(1) == 3).all() and ((pad == 1.5).sum(1) == 5).all())


def test_codewords_lie_in_e8_plus_quarter_and_are_distinct(codebook):
    assert codebook.shape == (NUM_CODES, 8)
    assert torch.unique(codebook, dim=0).shape[0] == NUM_CODES
    assert bool(_in_e8(codebook - 0.25).all())
    # the shift bit selects D̂8 + ¼ (bit 15 set) or D̂8 - ¼ = D8 + ¼
    shift_up = (torch.arange(NUM_CODES) >> 15) == 1
    y = codebook[shift_up] - 0.25
    assert bool(((y - 0.5) == (y - 0.5).round()).all())


def test_decoding_applies_the_stored_signs_and_the_parity_rule(codebook):
    codes = torch.arange(NUM_CODES)
    table = e8p_abs_table(torch.float64)
    shift = torch.where((codes >> 15) == 1, 0.25, -0.25).double().unsqueeze(1)
    x = codebook - shift
    assert torch.equal(x.abs(), table[codes & 255])
    stored_neg = torch.stack([(codes >> (8 + i)) & 1 for i in range(7)], 1).bool()
    assert torch.equal(x[:, 1:] < 0, stored_neg)
    assert bool(((x < 0).sum(1) % 2 == table[codes & 255].sum(1).round().long() % 2).all())


def test_int16_codes_decode_like_their_unsigned_value():
    codes = torch.arange(NUM_CODES)
    as_int16 = torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)
    assert torch.equal(e8p_decode(as_int16), e8p_decode(codes))


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])
def test_encoder_finds_the_nearest_codeword(codebook, scale):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(int(scale * 10)), dtype=torch.float64) * scale
    codes, values = e8p_encode(x)
    assert torch.equal(values, codebook[codes.long()])
    got = ((x - values) ** 2).sum(1)
    best = ((x * x).sum(1, keepdim=True) - 2 * x @ codebook.T + (codebook * codebook).sum(1)).min(1).values
    torch.testing.assert_close(got, best, rtol=1e-9, atol=1e-9)


def test_float32_encoder_is_nearest_to_float_tolerance(codebook):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)) * 1.2
    _, values = e8p_encode(x)
    xd = x.double()
    got = ((xd - values.double()) ** 2).sum(1)
    best = ((xd * xd).sum(1, keepdim=True) - 2 * xd @ codebook.T + (codebook * codebook).sum(1)).min(1).values
    assert float((got - best).max()) < 1e-4


def test_encoder_keeps_batch_shape_and_rejects_other_widths():
    codes, values = e8p_encode(torch.randn(3, 5, 8))
    assert codes.shape == (3, 5) and values.shape == (3, 5, 8) and codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < NUM_CODES
    with pytest.raises(ValueError, match="8-vectors"):
        e8p_encode(torch.randn(4, 6))


def test_one_bit_e8_table_and_encoder():
    t = e8_1bit_table(torch.float64)
    assert t.shape == (256, 8) and torch.unique(t, dim=0).shape[0] == 256
    assert bool(_in_e8(t).all())
    norms = (t * t).sum(1)
    assert int((norms == 0).sum()) == 1 and int((norms == 2).sum()) == 240 and int((norms == 4).sum()) == 15
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes, values = e8_1bit_encode(x)
    best = torch.cdist(x, t).min(1).values
    torch.testing.assert_close((x - values).norm(dim=1), best)
    assert torch.equal(values, t[codes.long()])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_rvq_decode_matches_encode(bits):
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    r = 3.0
    codes, values = rvq_encode(x, bits, r)
    assert codes.shape == (500, stage_count(bits))
    scales = tuple(r ** -k for k in range(stage_count(bits)))
    torch.testing.assert_close(rvq_decode(codes, bits, scales, torch.float64), values)
    codes2, values2 = rvq_encode(x, bits, (r,) * (stage_count(bits) - 1))
    assert torch.equal(codes2, codes) and torch.equal(values2, values)


def test_gaussian_mse_at_the_default_scales():
    """Per-coordinate MSE on N(0, 1): E8P beats the 2-bit Lloyd-Max scalar quantizer (0.1175), and each
    residual stage cuts the error (3-bit Lloyd-Max: 0.0345, 4-bit: 0.0095)."""
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    mse = {}
    for bits, rho, resid in ((2, 1.03, 1.0), (3, 0.98, 2.04), (4, 0.9, 3.85), (5, 0.85, (3.85, 2.04)),
                             (6, 0.8, (3.85, 3.4))):
        mse[bits] = float(((rvq_encode(x * rho, bits, resid)[1] / rho - x) ** 2).mean())
    assert mse[2] < 0.095 and mse[3] < 0.031 and mse[4] < 0.0092
    assert mse[5] < mse[4] / 2.5 and mse[6] < mse[5] / 2.5


def _problem(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = x * torch.exp(0.5 * torch.randn(in_f, generator=g))
    return torch.randn(out_f, in_f, generator=g), x.T @ x


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_quantize_matrix_weight_and_loss_are_consistent(bits):
    w, h = _problem(24, 40)
    r = quantize_matrix(w, h, bits, rho=1.0, resid_scale=3.0, multipliers=(0.9, 1.0, 1.1))
    assert r.codes.shape == (24, 5, stage_count(bits))
    assert r.multiplier in (0.9, 1.0, 1.1)
    assert all(torch.tensor(s).half().item() == s for s in r.scales)
    torch.testing.assert_close(r.weight, rvq_decode(r.codes, bits, r.scales).reshape(24, 40))
    assert r.loss == pytest.approx(proxy_loss(w, r.weight, h.double()))


def test_more_bits_and_more_scales_lower_the_loss():
    w, h = _problem(32, 64, seed=1)
    losses = [quantize_matrix(w, h, b, rho=r, resid_scale=s).loss
              for b, r, s in ((2, 1.03, 1), (3, .98, 2.04), (4, .9, 3.85), (5, .85, (3.85, 2.04)), (6, .8, (3.85, 3.4)))]
    assert losses[0] > losses[1] > losses[2] > losses[3] > losses[4]
    one = quantize_matrix(w, h, 2, rho=1.03, multipliers=(1.0,)).loss
    assert quantize_matrix(w, h, 2, rho=1.03, multipliers=(0.9, 1.0, 1.1)).loss <= one


def test_act_order_and_padding():
    w, h = _problem(16, 27, seed=2)
    r = quantize_matrix(w, h, 3, rho=0.98, resid_scale=2.04, act_order=True)
    assert r.codes.shape == (16, 4, 2) and r.weight.shape == (16, 27)
    assert sorted(r.perm.tolist()) == list(range(27))
    assert torch.equal(r.perm, torch.argsort(h.diagonal(), descending=True, stable=True))
    assert r.loss == pytest.approx(proxy_loss(w, r.weight, h.double()))


def test_dead_inputs_and_zero_weights():
    w, h = _problem(8, 16, seed=3)
    h[3, :] = 0
    h[:, 3] = 0
    r = quantize_matrix(w, h, 2, rho=1.03)
    assert torch.isfinite(r.weight).all() and r.loss < proxy_loss(w, torch.zeros_like(w), h.double())
    z = quantize_matrix(torch.zeros(8, 16), h, 2, rho=1.03)
    assert float(z.weight.abs().max()) < 1e-6


def test_norm12_padding_positions_are_distinct_triples():
    from casp.algorithms.e8p import _NORM12_HALF_POSITIONS

    assert len(set(_NORM12_HALF_POSITIONS)) == 29
    assert all(len(p) == 3 and len(set(p)) == 3 and set(p) <= set(range(8)) for p in _NORM12_HALF_POSITIONS)
    assert set(_NORM12_HALF_POSITIONS) <= set(itertools.combinations(range(8), 3))


@pytest.mark.parametrize("scale", [0.4, 1.03, 2.5])
def test_fast_encoder_equals_the_exhaustive_search(scale):
    """The D̂8-rounding fast path (with its fallback) finds codewords as near as the search over all 512 entries,
    at scales where the fallback is rare (0.4), common (1.03, the 2-bit operating point) and dominant (2.5)."""
    from casp.algorithms.e8p import e8p_encode_search

    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * scale
    codes, values = e8p_encode(x)
    _, searched = e8p_encode_search(x)
    torch.testing.assert_close(((x - values) ** 2).sum(1), ((x - searched) ** 2).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(e8p_decode(codes, torch.float64), values)


@pytest.mark.parametrize("scale", [0.4, 1.03, 2.5])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_cpu_encoder_gives_the_tensor_encoders_codewords(scale, threads, monkeypatch):
    """The compiled kernel (serial, and split over threads past `PARALLEL_VECTORS`) finds codewords as near as the
    tensor-op encoder it replaces on the CPU, in float32 as BlockLDLQ calls it."""
    from casp.algorithms import e8p as mod
    from casp.algorithms import e8p_kernel

    assert e8p_kernel.available()
    monkeypatch.setattr(e8p_kernel, "PARALLEL_VECTORS", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(11)) * scale
    codes, values = e8p_encode(x)
    reference, ref_values = mod._encode_tensors(x, x.shape[:-1], 512)
    assert codes.dtype == torch.int32 and values.dtype == torch.float32
    torch.testing.assert_close(((x - values) ** 2).sum(1), ((x - ref_values) ** 2).sum(1), rtol=0, atol=1e-5)
    assert (codes != reference).float().mean() < 0.001   # ties only


def test_all_candidates_in_one_sweep_equal_one_sweep_each():
    """quantize_candidates stacks every (bits, scale) trial into one BlockLDLQ sweep; each result is the one
    its own sweep gives, also when the trials are split over several sweeps."""
    from casp.algorithms import e8p as mod

    w, h = _problem(24, 40, seed=5)
    specs = [mod.StageSpec(2, 1.03, ()), mod.StageSpec(3, 0.98, (2.04,)), mod.StageSpec(5, 0.85, (3.85, 2.04))]
    together = mod.quantize_candidates(w, h, specs, multipliers=(0.9, 1.1))
    for spec, got in zip(specs, together):
        alone = quantize_matrix(w, h, spec.bits, rho=spec.rho, resid_scale=spec.resid_scale, multipliers=(0.9, 1.1))
        assert torch.equal(got.codes, alone.codes) and got.scales == alone.scales and got.multiplier == alone.multiplier
        torch.testing.assert_close(got.weight, alone.weight, rtol=0, atol=1e-6)
    old = mod.STACK_ELEMENTS
    try:
        mod.STACK_ELEMENTS = 24 * 40   # one trial per sweep
        split = mod.quantize_candidates(w, h, specs, multipliers=(0.9, 1.1))
    finally:
        mod.STACK_ELEMENTS = old
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(split, together))


def test_a_given_rms_codes_rows_as_in_the_whole_matrix():
    w, h = _problem(32, 40, seed=6)
    whole = quantize_matrix(w, h, 3, rho=0.98, resid_scale=2.04)
    rms = float(w.pow(2).mean().sqrt())
    part = quantize_matrix(w[5:12], h, 3, rho=0.98, resid_scale=2.04, rms=rms)
    assert torch.equal(part.codes, whole.codes[5:12])
