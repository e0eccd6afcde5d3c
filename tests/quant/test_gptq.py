import logging

import pytest
import torch

from casp.quant import GPTQ, QuantSpec, get_quantizer_class, quant_loss
from casp.quant.scalar import grid_params


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated_problem(out_f=64, in_f=256, samples=1024, seed=0, spread=0.5):
    """W and H = XᵀX with correlated, unevenly scaled (log-normal, sigma=spread) input features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=gen) / in_f**0.5
    feat_scale = torch.exp(spread * torch.randn(in_f, generator=gen))
    x = (torch.randn(samples, in_f, generator=gen) @ mix + 0.2 * torch.randn(samples, in_f, generator=gen))
    x = x * feat_scale
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    return w, (x.double().T @ x.double())


def _damped(h, damp):
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype), dead


def _grid_q(col, scale, zero, bits):
    maxq = (1 << bits) - 1
    return (torch.round(col / scale + zero).clamp(0, maxq) - zero) * scale


def reference_gptq_cholesky(w, h, bits, group_size, sym, damp=0.01):
    """Textbook GPTQ without blocking: one column at a time, rows of the Cholesky factor of H⁻¹."""
    h, dead = _damped(h, damp)
    w = w.double().clone()
    w[:, dead] = 0
    n = w.shape[1]
    g = n if group_size == -1 else group_size
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(n):
        if j % g == 0:
            s, z = (t.double() for t in grid_params(w[:, j:j + g], bits, sym))
        q[:, j] = _grid_q(w[:, j], s, z, bits)
        e = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return q


def reference_obq(w, h, bits, group_size, sym, damp=0.01):
    """The same greedy order written as OBQ: explicit inverse Hessian, downdated after each column."""
    h, dead = _damped(h, damp)
    w = w.double().clone()
    w[:, dead] = 0
    n = w.shape[1]
    g = n if group_size == -1 else group_size
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(n):
        if j % g == 0:
            s, z = (t.double() for t in grid_params(w[:, j:j + g], bits, sym))
        q[:, j] = _grid_q(w[:, j], s, z, bits)
        e = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= e[:, None] * hinv[j, j:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


CASES = [(2, 128, False), (3, 64, False), (4, -1, False), (2, 100, True), (3, 96, True), (4, 128, True)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_matches_unblocked_reference(bits, group_size, sym):
    w, h = correlated_problem()
    spec = QuantSpec(bits, group_size, sym)
    ref = reference_gptq_cholesky(w, h, bits, group_size, sym)
    ref_loss = quant_loss(w, ref, h)
    obq_loss = quant_loss(w, reference_obq(w, h, bits, group_size, sym), h)
    assert obq_loss == pytest.approx(ref_loss, rel=1e-3)
    for block_size in (32, 128):  # 32: groups span several lazy blocks; 128: blocks cut groups
        _, q = GPTQ(act_order=False, block_size=block_size).quantize(w, h, spec)
        loss = quant_loss(w, q, h)
        assert loss == pytest.approx(ref_loss, rel=0.01), (block_size, loss, ref_loss)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn(bits, act_order):
    w, h = correlated_problem(seed=bits)
    spec = QuantSpec(bits, 128, False)
    _, q_rtn = get_quantizer_class("rtn")().quantize(w, None, spec)
    _, q = GPTQ(act_order=act_order).quantize(w, h, spec)
    assert quant_loss(w, q, h) < 0.8 * quant_loss(w, q_rtn, h)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(2, 128), QuantSpec(3, 100, True), QuantSpec(4, -1), QuantSpec(8, 64)])
def test_stored_form_reproduces_output_bitwise(act_order, spec):
    w, h = correlated_problem(out_f=24, in_f=230)
    qw, q = GPTQ(act_order=act_order).quantize(w, h.float(), spec)
    assert q.dtype == torch.float32
    assert torch.equal(qw.dequantize(), q)
    assert qw.meta["format"] == "scalar" and qw.meta["method"] == "gptq"


@pytest.mark.parametrize("in_f", [1, 20, 129])
def test_rows_shorter_than_a_group(in_f):
    w, h = correlated_problem(out_f=5, in_f=in_f)
    for act_order in (False, True):
        qw, q = GPTQ(act_order=act_order).quantize(w, h, QuantSpec(2, 128))
        assert torch.equal(qw.dequantize(), q) and torch.isfinite(q).all()


def test_block_size_does_not_change_result():
    w, h = correlated_problem(out_f=16, in_f=160)
    spec = QuantSpec(3, 64)
    _, a = GPTQ(block_size=1).quantize(w, h, spec)
    _, b = GPTQ(block_size=128).quantize(w, h, spec)
    assert quant_loss(w, a, h) == pytest.approx(quant_loss(w, b, h), rel=1e-3)


def test_dead_columns():
    w, h = correlated_problem(out_f=8, in_f=64)
    h[:, 5] = 0
    h[5, :] = 0
    qw, q = GPTQ().quantize(w, h, QuantSpec(4, 32))
    assert torch.isfinite(q).all()
    assert torch.all(q[:, 5] == 0)  # asymmetric grid holds 0 exactly
    assert torch.equal(qw.dequantize(), q)


def test_singular_hessian_retries_with_more_damping(caplog):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=gen)  # rank 8 < 64
    h = x.T @ x
    w = torch.randn(4, 64, generator=gen)
    with caplog.at_level(logging.WARNING, logger="casp.quant.gptq"):
        _, q = GPTQ(damp=0.0).quantize(w, h, QuantSpec(4, 32))
    assert torch.isfinite(q).all()
    assert any("Cholesky failed" in r.message for r in caplog.records)


def test_argument_errors():
    w, h = correlated_problem(out_f=4, in_f=32)
    with pytest.raises(ValueError):
        GPTQ().quantize(w, None, QuantSpec(2, 32))
    with pytest.raises(ValueError):
        GPTQ(act_order=True, static_groups=False).quantize(w, h, QuantSpec(2, 32))
    with pytest.raises(ValueError):
        GPTQ().quantize(w, h[:16, :16], QuantSpec(2, 32))


@pytest.mark.parametrize("chunk", [1 << 22, 5000])
def test_many_settings_in_one_sweep_equal_one_run_each(chunk, monkeypatch):
    """One Cholesky and one sweep over stacked copies give each setting's own GPTQ result, bit for bit
    (also when the copies are split into chunks)."""
    from casp.quant import gptq

    monkeypatch.setattr(gptq, "MANY_ELEMENTS", chunk)
    w, h = correlated_problem(out_f=24, in_f=96)
    h[5, :] = h[:, 5] = 0.0   # a dead input
    specs = [QuantSpec(b, g) for b in (2, 3, 8) for g in (32, 64, -1)] + [QuantSpec(4, 32, sym=True)]
    many = GPTQ().dequantize_many(w, h.float(), specs)
    for spec, q in zip(specs, many):
        assert torch.equal(q, GPTQ().quantize(w, h.float(), spec)[1]), spec.label()


def test_many_without_act_order_falls_back_to_one_run_each():
    w, h = correlated_problem(out_f=8, in_f=64)
    q = GPTQ(act_order=False)
    specs = [QuantSpec(3, 32), QuantSpec(2, -1)]
    for spec, d in zip(specs, q.dequantize_many(w, h.float(), specs)):
        assert torch.equal(d, q.quantize(w, h.float(), spec)[1])


def test_default_ladder_is_bits_2_3_4_8_by_groups_32_64_128_channel():
    labels = [s.label() for s in GPTQ().candidates()]
    assert labels == [f"{b}b-{g}" for b in (2, 3, 4, 8) for g in ("g32", "g64", "g128", "ch")]


@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_shrink_interpolates_between_gptq_and_rtn(act_order):
    """--hessian-shrink 1 leaves a diagonal H, where error feedback has nothing to move: RTN on the same
    grid; 0 is GPTQ as published; the one-sweep path honours it too."""
    w, h = correlated_problem(seed=7)
    spec = QuantSpec(3, 64, False)
    _, q_rtn = get_quantizer_class("rtn")().quantize(w, None, spec)
    _, q_full = GPTQ(act_order=act_order, damp=0.0, shrink=1.0).quantize(w, h, spec)
    torch.testing.assert_close(q_full, q_rtn, rtol=0, atol=1e-6)
    losses = [quant_loss(w, GPTQ(act_order=act_order, shrink=s).quantize(w, h, spec)[1], h) for s in (0.0, 0.5)]
    assert losses[0] < losses[1] < quant_loss(w, q_rtn, h)
    if act_order:
        assert torch.equal(GPTQ(shrink=0.5).dequantize_many(w, h.float(), [spec])[0],
                           GPTQ(shrink=0.5).quantize(w, h.float(), spec)[1])
    with pytest.raises(ValueError, match="hessian-shrink"):
        GPTQ(shrink=1.5)
