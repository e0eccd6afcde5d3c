"""The incoherence transform: exact bit count, orthogonal side maps, the incoherence effect, and a full
compress → save → from_pretrained round trip with GPTQ in the rotated basis."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import casp
from casp.algorithms.hadamard import hadamard_transform
from casp.config import CompressionConfig
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear
from casp.transforms import Incoherence, get_transform_class
from casp.transforms.base import restore_weight, transform_weight, transform_xtx

# (out, in): Hadamard on both sides, fallback on one side (100 = 25·4, 11008 = 43·256), on both
SHAPES = [(64, 192), (1536, 576), (100, 192), (128, 11008), (100, 100)]


def _tensor_bits(p) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in p.tensors.values())


def _dense(fn, n: int) -> torch.Tensor:
    """fn(I) for a side map fn: x Vᵀ gives Vᵀ, x V gives V."""
    return fn(torch.eye(n, dtype=torch.float64))


def test_registered_by_name():
    assert get_transform_class("incoherence") is Incoherence


@pytest.mark.parametrize("m,n", SHAPES)
def test_stored_bits_are_exact(m, n):
    t = Incoherence()
    p = t.build(m, n, seed=12345)
    assert p.meta["name"] == "incoherence" and (p.meta["out_features"], p.meta["in_features"]) == (m, n)
    fallback = "block-orthogonal" in (p.meta["kind_out"], p.meta["kind_in"])
    assert p.meta.get("seed_bits", 0) == (64 if fallback else 0)
    assert t.stored_bits(m, n) == _tensor_bits(p) + p.meta.get("seed_bits", 0)
    assert t.stored_bits(m, n) == 32 * (math.ceil(m / 32) + math.ceil(n / 32)) + p.meta.get("seed_bits", 0)
    empty = Incoherence.empty_tensors(json.loads(json.dumps(p.meta)))
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {k: (v.shape, v.dtype) for k, v in p.tensors.items()}


def test_kinds_follow_the_factorisation():
    p = Incoherence().build(128, 11008, seed=1)
    assert (p.meta["kind_out"], p.meta["kind_in"]) == ("hadamard", "block-orthogonal")
    assert (p.meta["factor_out"], p.meta["factor_in"]) == (1, 43)
    assert Incoherence().build(5632, 4864, seed=1).meta == {
        "name": "incoherence", "out_features": 5632, "in_features": 4864, "kind_out": "hadamard", "kind_in": "hadamard",
        "factor_out": 44, "factor_in": 76}


def test_signs_are_random_and_seeded():
    a, b, c = (Incoherence().build(64, 192, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["signs_in"], c.tensors["signs_in"])


@pytest.mark.parametrize("m,n", SHAPES[:3] + SHAPES[4:])
def test_side_maps_are_orthogonal_and_consistent(m, n):
    p = Incoherence().build(m, n, seed=7)
    t, meta = p.tensors, p.meta
    for size, fwd, inv in ((n, Incoherence.in_forward, Incoherence.in_inverse),
                           (m, Incoherence.out_forward, Incoherence.out_inverse)):
        vt = _dense(lambda x: fwd(t, meta, x), size)
        v = _dense(lambda x: inv(t, meta, x), size)
        eye = torch.eye(size, dtype=torch.float64)
        torch.testing.assert_close(v, vt.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(v @ v.T, eye, rtol=0, atol=1e-10)
        assert not torch.allclose(v, v.T)  # signs (and Paley factors) make V asymmetric
    if meta["kind_in"] != "hadamard":
        return
    # on a Hadamard side V = M·diag(s): its columns are ± the fast transform's columns
    vt = _dense(lambda x: Incoherence.in_forward(t, meta, x), n)
    m_dense = hadamard_transform(torch.eye(n, dtype=torch.float64)).T
    torch.testing.assert_close(vt.T.abs(), m_dense.abs(), rtol=0, atol=1e-12)


def test_large_sides_invert_exactly():
    p = Incoherence().build(128, 11008, seed=3)
    x = torch.randn(4, 11008, dtype=torch.float64)
    y = Incoherence.in_forward(p.tensors, p.meta, x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(Incoherence.in_inverse(p.tensors, p.meta, y), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,n", [(192, 576), (100, 192)])
def test_weight_and_xtx_maps_keep_the_loss(m, n):
    p = Incoherence().build(m, n, seed=11)
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(m, n, dtype=torch.float64, generator=gen), torch.randn(300, n, dtype=torch.float64, generator=gen)
    h = x.T @ x
    wt, ht = transform_weight(Incoherence, p, w), transform_xtx(Incoherence, p, h)
    torch.testing.assert_close(restore_weight(Incoherence, p, wt), w, rtol=0, atol=1e-10)
    d = torch.randn(m, n, dtype=torch.float64, generator=gen)
    dt = transform_weight(Incoherence, p, d)
    torch.testing.assert_close(torch.trace(dt @ ht @ dt.T), torch.trace(d @ h @ d.T), rtol=1e-10, atol=0)


@pytest.mark.parametrize("m,n", [(256, 576), (100, 192)])
def test_an_outlier_is_spread_out(m, n):
    w = 0.01 * torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    w[17, 33] = 1.0

    def peak(a):
        return (a.abs().max() / a.pow(2).mean().sqrt()).item()

    wt = transform_weight(Incoherence, Incoherence().build(m, n, seed=5), w)
    assert peak(w) > 50 and peak(wt) < 6 and peak(wt) < peak(w) / 10


def test_module_round_trip_on_a_fallback_shape():
    m, n = 100, 100
    p = Incoherence().build(m, n, seed=9)
    mod = TransformedLinear(nn.Linear(n, m, bias=False).double(), p, bias=torch.randn(m))
    assert mod.transform_bits() == Incoherence().stored_bits(m, n)
    spec = json.loads(json.dumps(mod.spec()))
    new = TransformedLinear.from_spec(spec)
    new.inner = nn.Linear(n, m, bias=False).double()
    new.load_state_dict(mod.state_dict())
    x = torch.randn(3, n, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(new(x), mod(x))
        dense = mod.inner.weight @ Incoherence.in_forward(p.tensors, p.meta, torch.eye(n, dtype=torch.float64)).T
        torch.testing.assert_close(mod(x) - mod.bias.double(),
                                   Incoherence.out_inverse(p.tensors, p.meta, x @ dense.T), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("incoherence") / "out"
    cfg = CompressionConfig(bits=3.0, quantizer="gptq", allocation="uniform", qk_rank=0, transform="incoherence",
                            calib_samples=8, calib_seq_len=32, calib_text=str(scene_text))
    return casp.compress(tiny_llama_dir, out, cfg, progress=False), out


def test_report_bits_are_gptq_plus_signs(compressed):
    res, _ = compressed
    gptq = casp.quant.GPTQ()
    rows = res.report["layers"]
    assert rows
    for row in rows:
        m, n = row["out_features"], row["in_features"]
        assert row["stored_bits"] == gptq.stored_bits(gptq.uniform_setting(3), m, n) + Incoherence().stored_bits(m, n)


def test_quantized_in_the_hadamard_basis(compressed, tiny_llama_dir):
    res, _ = compressed
    original = casp.load(tiny_llama_dir)
    mod = res.model.model.layers[0].mlp.down_proj
    assert isinstance(mod, TransformedLinear) and isinstance(mod.inner, PackedLinear)
    assert (mod.meta["kind_out"], mod.meta["kind_in"]) == ("hadamard", "hadamard")
    w = original.model.layers[0].mlp.down_proj.weight.data
    stored = mod.inner.dense_weight()
    with torch.no_grad():
        dense = mod(torch.eye(mod.in_features)).T
    torch.testing.assert_close(dense, restore_weight(Incoherence, mod.params(), stored), rtol=0, atol=1e-5)
    assert (stored - w).abs().mean() > 0.5 * w.abs().mean(), "the packed weight should live in the rotated basis"
    assert (dense - w).norm() < 0.4 * w.norm(), "undoing the rotation gives back a close (3-bit) weight"


def test_from_pretrained_reproduces_logits_exactly(compressed):
    from transformers import AutoModelForCausalLM

    res, out = compressed
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert any(isinstance(m, TransformedLinear) and m.meta["name"] == "incoherence" for m in model.modules())
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)


@pytest.mark.parametrize("m,n", [(64, 192), (100, 100)])
def test_many_rows_fold_the_maps_into_one_dense_matmul(m, n, monkeypatch):
    """Past rows·(in+out) > 2·in·out, and without a gradient, forward is one matmul by W = Uᵀ W' V."""
    import casp.nn.transformed_linear as tl

    p = Incoherence().build(m, n, seed=3)
    mod = TransformedLinear(nn.Linear(n, m, bias=False), p, bias=torch.randn(m))
    rows = 2 * n * m // (n + m) + 1
    x = torch.randn(rows, n)
    calls, maps = [], tl.TransformedLinear._maps
    monkeypatch.setattr(tl.TransformedLinear, "_maps", lambda self, v: calls.append(v.shape[0]) or maps(self, v))
    with torch.no_grad():
        folded = mod(x)
        assert calls == []
        mod(x[:2])
        assert calls == [2]
        torch.testing.assert_close(folded, maps(mod, x) + mod.bias, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    mod(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_xtx_transformed_by_pieces_of_rows_is_v_h_v_transposed(monkeypatch):
    """`transform_xtx` works on pieces of rows to bound its memory; the result is V H Vᵀ whatever the piece."""
    import casp.transforms.base as base

    n = 192
    p = Incoherence().build(8, n, seed=5)
    x = torch.randn(400, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    v = Incoherence.in_forward(p.tensors, p.meta, torch.eye(n, dtype=torch.float64))   # rows: V's columns
    whole = transform_xtx(Incoherence, p, h)
    torch.testing.assert_close(whole, v.T @ h @ v, rtol=1e-10, atol=1e-9)
    monkeypatch.setattr(base, "XTX_PIECE_ELEMENTS", 5 * n)
    assert torch.equal(transform_xtx(Incoherence, p, h), whole)
