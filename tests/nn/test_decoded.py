"""`casp.nn.decoded`: a layer's compressed linears run as their dense weights inside the block, and are put
back untouched after; factored and hooked modules keep their own forward."""
import pytest
import torch
from torch import nn

from casp.models.engine import LayerInputs, run_layer
from casp.nn import LowRankLinear
from casp.nn.decoded import DecodedLinear, decoded
from test_casp_linear import MODULES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Holder(nn.Module):
    """A stand-in decoder layer: one casp module under a dotted name, as in a real layer."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.block = nn.Module()
        self.block.proj = module

    def forward(self, x, **_):
        return self.block.proj(x)


@pytest.mark.parametrize("case", sorted(MODULES))
def test_decoded_layer_computes_the_stored_function(case):
    module = MODULES[case]()
    holder = _Holder(module)
    x = torch.randn(3, 40, module.in_features, generator=torch.Generator().manual_seed(0))
    expected = holder(x)
    with torch.no_grad(), decoded(holder) as inside:
        got = inside(x)
        swapped = inside.block.proj
    assert holder.block.proj is module
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if isinstance(module, LowRankLinear):
        assert swapped is module
    else:
        assert isinstance(swapped, DecodedLinear)


def test_lowrank_children_are_decoded_not_the_product():
    module = MODULES["lowrank-stored"]()
    holder = _Holder(module)
    with decoded(holder):
        assert isinstance(module.down, DecodedLinear) and isinstance(module.up, DecodedLinear)
    assert not isinstance(module.down, DecodedLinear) and not isinstance(module.up, DecodedLinear)


def test_hooked_module_and_disabled_block_keep_the_stored_module():
    module = MODULES["packed-scalar"]()
    holder = _Holder(module)
    with decoded(holder, enabled=False):
        assert holder.block.proj is module
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    with decoded(holder):
        assert holder.block.proj is module
        holder(torch.randn(2, module.in_features))
    handle.remove()
    assert seen == [torch.Size([2, module.in_features])]


def test_stored_module_restored_when_the_block_raises():
    module = MODULES["transformed"]()
    holder = _Holder(module)
    with pytest.raises(RuntimeError), decoded(holder):
        raise RuntimeError("stop")
    assert holder.block.proj is module


def test_run_layer_decodes_once_and_matches_the_stored_layer(monkeypatch):
    module = MODULES["packed-e8p"]()
    holder = _Holder(module)
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(1, 64, module.in_features, generator=g) for _ in range(4)]
    inputs = LayerInputs(hidden, [{} for _ in hidden])
    calls = []
    original = type(module).dense_weight
    monkeypatch.setattr(type(module), "dense_weight", lambda self: calls.append(1) or original(self))
    outs = run_layer(holder, inputs)
    assert len(calls) == 1
    with torch.no_grad():
        for h, out in zip(hidden, outs):
            torch.testing.assert_close(out, module(h), rtol=1e-4, atol=1e-4)
