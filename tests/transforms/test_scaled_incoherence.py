"""`incoherence-scaled`: the incoherence transform with real-valued fp16 sides. It starts as the very same
rotation (same codes), counts its fp16 vectors exactly, computes diag(s_out)·Uᵀ·W'·V·diag(s_in) once its
vectors are tuned, and a tuned model saves and reloads bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import casp
from casp.config import CompressionConfig
from casp.nn.transformed_linear import TransformedLinear
from casp.transforms import Incoherence, ScaledIncoherence, get_transform_class
from casp.transforms.base import restore_weight, transform_weight

SHAPES = [(64, 192), (1536, 576), (100, 192), (100, 100)]


def test_registered_by_name_and_tunable():
    assert get_transform_class("incoherence-scaled") is ScaledIncoherence
    assert ScaledIncoherence.tunable == ("scales_out", "scales_in") and Incoherence.tunable == ()


@pytest.mark.parametrize("m,n", SHAPES)
def test_stored_bits_are_exact_and_the_rotation_is_incoherence(m, n):
    p, q = ScaledIncoherence().build(m, n, seed=77), Incoherence().build(m, n, seed=77)
    bits = sum(t.numel() * t.element_size() * 8 for t in p.tensors.values()) + p.meta.get("seed_bits", 0)
    assert ScaledIncoherence().stored_bits(m, n) == bits == 16 * (m + n) + q.meta.get("seed_bits", 0)
    assert p.meta == {**q.meta, "name": "incoherence-scaled"}
    assert set(p.tensors["scales_in"].tolist()) == {-1.0, 1.0}
    empty = ScaledIncoherence.empty_tensors(json.loads(json.dumps(p.meta)))
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {k: (v.shape, v.dtype) for k, v in p.tensors.items()}
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transform_weight(ScaledIncoherence, p, w), transform_weight(Incoherence, q, w))


@pytest.mark.parametrize("m,n", [(64, 192), (100, 100)])
def test_tuned_vectors_scale_rows_and_columns_around_the_fixed_codes(m, n):
    """With real sides the module computes diag(s_out)·Uᵀ·W'·V·diag(s_in): its few-row maps, its folded
    many-row weight and `restore_weight` agree."""
    p = ScaledIncoherence().build(m, n, seed=5)
    gen = torch.Generator().manual_seed(1)
    signs = {k: v.double() for k, v in p.tensors.items()}
    for k in p.tensors:
        p.tensors[k] = (p.tensors[k].float() * (0.5 + torch.rand(p.tensors[k].shape, generator=gen))).half()
    inner = nn.Linear(n, m, bias=False)
    mod = TransformedLinear(inner, p, bias=None)
    wt = inner.weight.detach().double()
    rotated = restore_weight(ScaledIncoherence, type(p)({k: v.to(torch.float64) for k, v in signs.items()}, p.meta), wt)
    s_out, s_in = (p.tensors[k].double() * signs[k] for k in ("scales_out", "scales_in"))
    expected = s_out[:, None] * rotated * s_in[None, :]
    with torch.no_grad():
        few = mod(torch.eye(n)[:2])
        many = mod(torch.eye(n))
    torch.testing.assert_close(many.T.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(few.T.double(), expected[:, :2], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tuned(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaled") / "out"
    cfg = CompressionConfig(bits=2.0, quantizer="e8", allocation="uniform", qk_rank=0, transform="incoherence-scaled",
                            calib_samples=16, calib_seq_len=32, calib_text=str(scene_text), finetune_steps=12)
    return casp.compress(tiny_llama_dir, out, cfg, progress=False), out


def test_finetuning_tunes_the_sides_and_bits_count_them(tuned, tiny_llama_dir, scene_text, tmp_path):
    res, _ = tuned
    e8 = casp.quant.get_quantizer_class("e8")()
    for row in res.report["layers"]:
        m, n = row["out_features"], row["in_features"]
        assert row["stored_bits"] == e8.stored_bits(e8.uniform_setting(2), m, n) + ScaledIncoherence().stored_bits(m, n)
    assert res.report["finetune"]["layers_improved"] > 0
    sides = [m.transform_scales_in for m in res.model.modules()
             if isinstance(m, TransformedLinear) and m.meta["name"] == "incoherence-scaled"]
    assert sides and all(s.dtype == torch.float16 for s in sides)
    assert any(not torch.equal(s.abs(), torch.ones_like(s)) for s in sides), "some side left ±1: nothing was tuned"
    plain_cfg = CompressionConfig(bits=2.0, quantizer="e8", allocation="uniform", qk_rank=0, transform="incoherence",
                                  calib_samples=16, calib_seq_len=32, calib_text=str(scene_text))
    plain = casp.compress(tiny_llama_dir, tmp_path / "plain", plain_cfg, progress=False)
    a = res.model.model.layers[0].mlp.down_proj.inner
    b = plain.model.model.layers[0].mlp.down_proj.inner
    assert torch.equal(a.codes, b.codes), "the codes are those of plain incoherence"


def test_from_pretrained_reproduces_tuned_logits_exactly(tuned):
    from transformers import AutoModelForCausalLM

    res, out = tuned
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)
