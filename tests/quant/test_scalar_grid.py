import pytest
import torch

from casp.quant import QuantizedWeight, QuantSpec, get_format, get_quantizer_class
from casp.quant.scalar import empty_scalar_tensors, grid_params, num_groups, quantize_to_grid


def test_num_groups():
    assert num_groups(4096, 128) == 32
    assert num_groups(4097, 128) == 33
    assert num_groups(100, -1) == 1
    with pytest.raises(ValueError):
        num_groups(10, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_grid_covers_range_and_zero_is_a_code(bits):
    w = torch.randn(50, 64)
    scale, zero = grid_params(w, bits, sym=False)
    maxq = (1 << bits) - 1
    assert torch.equal(scale, scale.half().float())  # fp16-exact
    assert torch.all(zero == zero.round()) and zero.min() >= 0 and zero.max() <= maxq
    lo, hi = -zero * scale, (maxq - zero) * scale
    tol = scale * (0.5 + maxq * 2.0 ** -10)  # zero-point rounding + fp16 rounding of the scale
    assert torch.all(lo <= w.amin(1).clamp(max=0) + tol)
    assert torch.all(hi >= w.amax(1).clamp(min=0) - tol)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sym_grid_is_symmetric(bits):
    w = torch.randn(10, 32)
    scale, zero = grid_params(w, bits, sym=True)
    maxq = (1 << bits) - 1
    assert torch.all(zero == maxq / 2)
    levels = (torch.arange(maxq + 1).float() - maxq / 2)
    assert torch.allclose(levels, -levels.flip(0))
    assert torch.allclose(levels[-1] * scale, w.abs().amax(1), rtol=1e-3)


def test_zero_and_constant_groups():
    w = torch.zeros(3, 16)
    scale, zero = grid_params(w, 2, sym=False)
    codes = quantize_to_grid(w, scale[:, None], zero[:, None], 2)
    assert torch.all((codes.float() - zero[:, None]) * scale[:, None] == 0)


def test_tiny_scales_do_not_underflow():
    w = torch.full((2, 8), 1e-9)
    scale, _ = grid_params(w, 4, sym=False)
    assert torch.all(scale > 0)


@pytest.mark.parametrize("sym", [False, True])
def test_meta_and_empty_tensors(sym):
    spec = QuantSpec(3, 100, sym)
    qw, _ = get_quantizer_class("rtn")().quantize(torch.randn(40, 250), None, spec)
    m = qw.meta
    assert m["format"] == "scalar" and m["bits"] == 3 and m["group_size"] == 100
    assert m["sym"] is sym and (m["out_features"], m["in_features"]) == (40, 250)
    empty = get_format("scalar").empty_tensors(m)
    assert empty.keys() == qw.tensors.keys()
    for k in empty:
        assert empty[k].shape == qw.tensors[k].shape and empty[k].dtype == qw.tensors[k].dtype
    assert empty_scalar_tensors(m).keys() == qw.tensors.keys()
    # meta alone is enough to rebuild: a copy of tensors + meta dequantizes identically
    clone = QuantizedWeight({k: v.clone() for k, v in qw.tensors.items()}, dict(m))
    assert torch.equal(clone.dequantize(), qw.dequantize())


def test_unknown_format():
    with pytest.raises(KeyError):
        get_format("no-such-format")


def test_a_source_grid_is_reproduced_by_its_bits_on_groups_inside_its_own():
    from casp.quant.scalar import QuantSpec, reproduces

    grid = (4, 32)
    assert [reproduces(QuantSpec(4, g), grid) for g in (8, 16, 32, 64, 128, -1)] == [True] * 3 + [False] * 3
    assert not reproduces(QuantSpec(3, 32), grid) and not reproduces(QuantSpec(4, 32, sym=True), grid)
    assert not reproduces(QuantSpec(4, 24), grid)   # groups that straddle two source groups
    assert reproduces(QuantSpec(8, 16), (8, 32)) and not reproduces(QuantSpec(8, 32), (5, 32))
