"""BlockLDLQ: the block LDL decomposition, the buffered rounding against the plain formula, and its loss."""
import pytest
import torch

from casp.algorithms.e8p import e8p_encode, rvq_encode
from casp.algorithms.hessian import prepare_hessian
from casp.algorithms.ldlq import (
    block_ldl,
    block_ldl_reference,
    block_ldlq,
    block_ldlq_reference,
    feedback_matrix,
    feedback_matrix_,
    proxy_loss,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated(out_f, in_f, seed=0, dtype=torch.float64):
    """W and a damped H = XᵀX with correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * in_f, in_f, generator=g, dtype=dtype) @ torch.randn(in_f, in_f, generator=g, dtype=dtype)
    x = x * torch.exp(0.5 * torch.randn(in_f, generator=g, dtype=dtype))
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    return w, prepare_hessian(x.T @ x, 0.01)


def test_block_ldl_factors_h():
    _, h = correlated(1, 40)
    low, d = block_ldl(h)
    eye = torch.eye(8, dtype=h.dtype)
    for k in range(5):
        s = slice(8 * k, 8 * k + 8)
        assert torch.equal(low[s, s], eye)
        assert not bool(low[s, 8 * k + 8:].any())  # block-lower
        torch.testing.assert_close(d[k], d[k].T)
        assert float(torch.linalg.eigvalsh(d[k]).min()) > 0
    torch.testing.assert_close(low.T @ torch.block_diag(*d) @ low, h, rtol=1e-10, atol=1e-8 * float(h.abs().max()))
    ref_low, ref_d = block_ldl_reference(h)
    torch.testing.assert_close(low, ref_low, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(d, ref_d, rtol=1e-8, atol=1e-8 * float(h.abs().max()))


def test_the_feedback_matrix_in_place_is_the_copying_one_in_h_s_memory():
    """`feedback_matrix_` overwrites H with A = Lᵀ - I; the copying version leaves H alone; both equal Lᵀ - I."""
    _, h = correlated(1, 56, seed=3)
    kept = h.clone()
    a, d = feedback_matrix(h)
    assert torch.equal(h, kept)
    low, d_ldl = block_ldl(h)
    assert torch.equal(a, low.T - torch.eye(56, dtype=h.dtype)) and torch.equal(d, d_ldl)
    a_, d_ = feedback_matrix_(h)
    assert a_.data_ptr() == h.data_ptr() and torch.equal(a_, a) and torch.equal(d_, d)


def test_block_ldlq_needs_no_h_when_given_its_feedback_matrix():
    w, h = correlated(4, 32, seed=4)
    quantize = lambda t: (t.round(), t.round())   # noqa: E731
    a = feedback_matrix(h)[0]
    q, codes = block_ldlq(w, h, quantize)
    q_, codes_ = block_ldlq(w, None, quantize, feedback=a)
    assert torch.equal(q, q_) and torch.equal(codes, codes_)
    with pytest.raises(ValueError, match="feedback matrix has shape"):
        block_ldlq(w, None, quantize, feedback=a[:8, :8])
    with pytest.raises(ValueError, match="H has shape None"):
        block_ldlq(w, None, quantize)


def test_block_ldl_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of the block size"):
        block_ldl(torch.eye(12))


@pytest.mark.parametrize("buffer", [8, 16, 24, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_buffered_block_ldlq_equals_the_plain_formula(buffer, bits):
    w, h = correlated(16, 48, seed=bits)
    w = w / w.pow(2).mean().sqrt()
    quant = (lambda t: rvq_encode(t, bits, 3.85))
    q, codes = block_ldlq(w, h, quant, buffer=buffer)
    q_ref, codes_ref = block_ldlq_reference(w, h, quant)
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-12)


def test_loss_is_the_sum_of_block_errors_weighted_by_d():
    w, h = correlated(12, 32, seed=3)
    q, _ = block_ldlq(w, h, e8p_encode)
    low, d = block_ldl(h)
    eta = (q - w) @ low.T
    total = sum(float(torch.einsum("oi,ij,oj->", eta[:, s:s + 8], d[s // 8], eta[:, s:s + 8])) for s in range(0, 32, 8))
    assert proxy_loss(w, q, h) == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_block_ldlq_beats_round_to_nearest(seed):
    w, h = correlated(32, 64, seed=seed, dtype=torch.float32)
    w = w * 1.03 / w.pow(2).mean().sqrt()
    q, _ = block_ldlq(w, h, e8p_encode)
    _, nearest = e8p_encode(w.reshape(32, 8, 8))
    assert proxy_loss(w, q, h) < proxy_loss(w, nearest.reshape(32, 64), h)


def test_block_size_one_is_gptq():
    """LDLQ with 1-column blocks and a fixed per-row grid is GPTQ without act-order (static grid)."""
    from casp.quant import QuantSpec, gptq_quantize
    from casp.quant.scalar import dequantize_grid, quantize_to_grid, rtn_codes

    w, h = correlated(16, 32, seed=7, dtype=torch.float32)
    spec = QuantSpec(3, -1)
    _, scale, zero = rtn_codes(w, spec)
    scale, zero = scale[:, 0], zero[:, 0]

    def scalar(t):
        c = quantize_to_grid(t[:, 0], scale, zero, 3)
        return c.unsqueeze(1), dequantize_grid(c, scale, zero).unsqueeze(1)

    _, codes = block_ldlq(w.double(), h, lambda t: scalar(t.float()), block=1)
    ref, _, _, _ = gptq_quantize(w, h.float(), spec, damp=0.0, act_order=False, static_groups=True)
    assert float((codes[..., 0] == ref).float().mean()) > 0.99
