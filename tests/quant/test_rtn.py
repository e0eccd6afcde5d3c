import pytest
import torch

from casp.quant import QuantSpec, available_quantizers, get_quantizer_class


def test_registered():
    assert {"rtn", "gptq"} <= set(available_quantizers())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64, 100])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_is_nearest_grid_point(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(17, 230)
    spec = QuantSpec(bits, group_size, sym)
    qw, deq = get_quantizer_class("rtn")().quantize(w, None, spec)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert torch.equal(qw.dequantize(), deq)
    # half a step inside the grid; up to a step at the ends (the zero point is rounded)
    scales = qw.tensors["scales"].float()
    g = 230 if group_size == -1 else group_size
    step = scales.repeat_interleave(g, dim=1)[:, :230]
    err = (w - deq).abs()
    assert torch.all(err <= step * (1 + 1e-2))
    assert (err <= 0.5 * step * (1 + 1e-3)).float().mean() > 0.95
    assert len(torch.unique(deq[0, :g])) <= 2 ** bits


def test_rtn_error_shrinks_with_bits():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    errs = [
        (w - get_quantizer_class("rtn")().quantize(w, None, QuantSpec(b, 128))[1]).pow(2).mean()
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


def test_rtn_exact_on_grid_values():
    # weights already on a 4-bit grid with zero in range come back unchanged
    codes = torch.randint(0, 16, (8, 128)).float()
    codes[:, 0], codes[:, 1] = 0, 15
    w = (codes - 5) * 0.25
    _, deq = get_quantizer_class("rtn")().quantize(w, None, QuantSpec(4, -1))
    assert torch.equal(deq, w)
