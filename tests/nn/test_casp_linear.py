"""The inference modules' common base: every registered class rebuilt from its JSON spec computes the same
outputs, and `dense_weight()` / `dense_bias()` are the plain linear each module computes."""
import json

import pytest
import torch
from torch import nn

from casp.nn import MODULE_TYPES, CaspLinear, LowRankLinear, PackedLinear, TransformedLinear, module_from_spec
from casp.nn.base import dense_weight_of
from casp.quant.aqlm import AQLMQuantizer, AQLMSetting
from casp.quant.e8 import E8Quantizer, E8Setting
from casp.quant.gptq import GPTQ
from casp.quant.scalar import QuantSpec
from casp.transforms.base import restore_weight, transform_weight, transform_xtx
from casp.transforms.incoherence import Incoherence
from random_problems import weight_and_xtx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bias(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _packed(out_f: int, in_f: int, quantizer=None, setting=QuantSpec(3, 32), bias: bool = True) -> PackedLinear:
    w, h = weight_and_xtx(out_f, in_f, seed=out_f + in_f)
    qw, _ = (quantizer or GPTQ()).quantize(w, h, setting)
    return PackedLinear.from_quantized(qw, _bias(out_f, 1) if bias else None)


def _transformed(out_f: int, in_f: int, bias: bool = True) -> TransformedLinear:
    w, h = weight_and_xtx(out_f, in_f, seed=3)
    params = Incoherence().build(out_f, in_f, seed=11)
    wt = transform_weight(Incoherence, params, w)
    ht = transform_xtx(Incoherence, params, h.double()).float()
    qw, _ = GPTQ().quantize(wt, ht, QuantSpec(4, 32))
    return TransformedLinear(PackedLinear.from_quantized(qw), params, _bias(out_f, 2) if bias else None)


def _lowrank_plain() -> LowRankLinear:
    g = torch.Generator().manual_seed(4)
    return LowRankLinear.from_factors(torch.randn(64, 16, generator=g), torch.randn(16, 96, generator=g),
                                      _bias(64, 5))


def _lowrank_stored() -> LowRankLinear:
    """As a run stores low-rank Q/K with a transform: `down` transformed, `up` packed with the bias."""
    mod = LowRankLinear(96, 64, 32, bias=True)
    mod.down = _transformed(32, 96, bias=False)
    mod.up = _packed(64, 32)
    return mod


MODULES = {
    "packed-scalar": lambda: _packed(48, 96),
    "packed-e8p": lambda: _packed(40, 64, E8Quantizer(scale_multipliers=(1.0,)), E8Setting(3)),
    "packed-aqlm": lambda: _packed(40, 32, AQLMQuantizer(rounds=1, kmeans_iters=2, codebook_bits=4, group_size=4,
                                                         candidate_bits=(2,)), AQLMSetting(2, 4, 4)),
    "packed-no-bias": lambda: _packed(48, 96, bias=False),
    "transformed": lambda: _transformed(48, 64),
    "lowrank": _lowrank_plain,
    "lowrank-stored": _lowrank_stored,
}


def _rebuilt(module: CaspLinear) -> nn.Module:
    """The module rebuilt as loading does: every casp module in it from its JSON spec (parents first),
    then the state dict."""
    specs = json.loads(json.dumps({n: m.spec() for n, m in module.named_modules() if isinstance(m, CaspLinear)}))
    root = module_from_spec(specs.pop(""))
    for name in sorted(specs, key=lambda n: n.count(".")):
        root.set_submodule(name, module_from_spec(specs[name]))
    root.load_state_dict(module.state_dict())
    return root


def test_every_registered_class_is_covered():
    assert {type(build()).kind for build in MODULES.values()} == set(MODULE_TYPES)
    assert MODULE_TYPES == {"packed": PackedLinear, "transformed": TransformedLinear, "lowrank": LowRankLinear}


@pytest.mark.parametrize("name", MODULES)
def test_spec_round_trip_gives_identical_outputs(name):
    module = MODULES[name]()
    rebuilt = _rebuilt(module)
    assert type(rebuilt) is type(module)
    assert rebuilt.spec() == module.spec()
    x = torch.randn(3, 5, module.in_features, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
    assert torch.equal(rebuilt.dense_weight(), module.dense_weight())


@pytest.mark.parametrize("name", MODULES)
def test_dense_weight_is_the_effective_weight(name):
    module = MODULES[name]()
    w, b = module.dense_weight(), module.dense_bias()
    assert w.shape == (module.out_features, module.in_features) and w.dtype == torch.float32
    assert not w.requires_grad
    x = torch.randn(7, module.in_features, generator=torch.Generator().manual_seed(7))
    want = x @ w.T + (b if b is not None else 0)
    with torch.no_grad():
        got = module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_dense_weights_compose():
    """A transformed module's weight is its inner weight mapped back; a low-rank one's is up·down."""
    t = _transformed(48, 64)
    torch.testing.assert_close(t.dense_weight(), restore_weight(Incoherence, t.params(), t.inner.dense_weight()),
                               rtol=1e-5, atol=1e-6)
    lr = _lowrank_stored()
    torch.testing.assert_close(lr.dense_weight(), lr.up.dense_weight() @ lr.down.dense_weight(), rtol=0, atol=0)
    plain = _lowrank_plain()
    assert torch.equal(plain.dense_weight(), plain.up.weight.detach() @ plain.down.weight.detach())
    assert dense_weight_of(plain.up) is not plain.up.weight and torch.equal(dense_weight_of(plain.up), plain.up.weight)


def test_transformed_dense_weight_is_what_forward_computes():
    """Bit for bit: the weight's rows are the module's outputs for the unit inputs (bias removed)."""
    t = _transformed(48, 64, bias=False)
    with torch.no_grad():
        assert torch.equal(t.dense_weight(), t(torch.eye(64)).T)


def test_unknown_kind_and_taken_kind():
    with pytest.raises(KeyError, match="unknown casp module type 'nope'"):
        module_from_spec({"type": "nope"})
    with pytest.raises(ValueError, match="already taken by PackedLinear"):
        class Again(CaspLinear, kind="packed"):
            pass
    assert MODULE_TYPES["packed"] is PackedLinear
