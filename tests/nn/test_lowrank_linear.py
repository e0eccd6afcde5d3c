"""LowRankLinear: the two factors as real modules, swappable children, shapes and dtypes."""
import pytest
import torch
from torch import nn

from casp.nn.lowrank_linear import LowRankLinear


def test_lowrank_linear_forward_and_children():
    a, b, bias = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    mod = LowRankLinear.from_factors(a, b, bias)
    assert isinstance(mod.up, nn.Linear) and isinstance(mod.down, nn.Linear)
    assert type(mod.up) is nn.Linear and type(mod.down) is nn.Linear
    assert (mod.in_features, mod.out_features, mod.rank) == (5, 6, 3)
    assert mod.down.bias is None and mod.up.bias is not None
    x = torch.randn(2, 7, 5)
    assert torch.allclose(mod(x), x @ (a @ b).T + bias, atol=1e-5)
    assert torch.allclose(mod.dense_weight(), a @ b)
    nob = LowRankLinear.from_factors(a, b)
    assert nob.up.bias is None
    assert torch.allclose(nob(x), x @ (a @ b).T, atol=1e-5)
    assert "rank=3" in repr(mod)


def test_lowrank_linear_children_are_swappable():
    mod = LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 3))
    calls = []

    class Tag(nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self.inner, self.name = inner, name

        def forward(self, x):
            calls.append(self.name)
            return self.inner(x)

    ref = mod(torch.ones(1, 3))
    mod.down, mod.up = Tag(mod.down, "down"), Tag(mod.up, "up")
    assert torch.allclose(mod(torch.ones(1, 3)), ref)
    assert calls == ["down", "up"]


def test_from_factors_errors_and_dtype():
    with pytest.raises(ValueError):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(ValueError):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5), torch.randn(3))
    mod = LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5), dtype=torch.float64)
    assert mod.up.weight.dtype == torch.float64
