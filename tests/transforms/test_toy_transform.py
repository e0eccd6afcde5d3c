"""The weight-transform stage with a toy orthogonal transform defined here and nowhere else.

U and V are random orthogonal matrices (stored in fp16, counted in the bits); GPTQ quantizes
U W Vᵀ against V XᵀX Vᵀ, and `TransformedLinear` undoes the rotation at inference.
"""
from __future__ import annotations

import pytest
import torch

import casp
from casp.config import CompressionConfig
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear
from casp.transforms.base import (
    TransformParams, WeightTransform, register_transform, restore_weight, transform_weight, transform_xtx,
)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).half()


@register_transform
class DenseRotation(WeightTransform):
    name = "toy-rotation"

    def build(self, out_features, in_features, seed):
        gen = torch.Generator().manual_seed(seed)
        return TransformParams({"u": _orthogonal(out_features, gen), "v": _orthogonal(in_features, gen)},
                               {"name": self.name, "out_features": out_features, "in_features": in_features})

    def stored_bits(self, out_features, in_features):
        return 16 * (out_features ** 2 + in_features ** 2)

    @staticmethod
    def empty_tensors(meta):
        return {"u": torch.zeros(meta["out_features"], meta["out_features"], dtype=torch.float16),
                "v": torch.zeros(meta["in_features"], meta["in_features"], dtype=torch.float16)}

    @staticmethod
    def in_forward(t, meta, x):
        return x @ t["v"].to(x.dtype).T

    @staticmethod
    def in_inverse(t, meta, x):
        return x @ t["v"].to(x.dtype)

    @staticmethod
    def out_forward(t, meta, z):
        return z @ t["u"].to(z.dtype).T

    @staticmethod
    def out_inverse(t, meta, z):
        return z @ t["u"].to(z.dtype)


def test_weight_and_xtx_maps_keep_the_quantization_loss():
    """tr(Δ'H'Δ'ᵀ) in the rotated basis equals tr(ΔHΔᵀ) in the original one (orthogonality)."""
    t = DenseRotation()
    p = t.build(12, 20, seed=3)
    p.tensors = {k: torch.linalg.qr(v.double())[0] for k, v in p.tensors.items()}  # exactly orthogonal
    w, x = torch.randn(12, 20, dtype=torch.float64), torch.randn(50, 20, dtype=torch.float64)
    h = x.T @ x
    wt, ht = transform_weight(DenseRotation, p, w), transform_xtx(DenseRotation, p, h)
    torch.testing.assert_close(restore_weight(DenseRotation, p, wt), w)
    d = torch.randn(12, 20, dtype=torch.float64)
    dt = transform_weight(DenseRotation, p, d)
    torch.testing.assert_close(torch.trace(dt @ ht @ dt.T), torch.trace(d @ h @ d.T))


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("rot") / "out"
    cfg = CompressionConfig(bits=4.0, quantizer="gptq", allocation="uniform", qk_rank=0, transform="toy-rotation",
                            calib_samples=8, calib_seq_len=32, calib_text=str(scene_text))
    return casp.compress(tiny_llama_dir, out, cfg, progress=False), out


def test_transform_bits_are_counted(compressed):
    res, _ = compressed
    gptq = casp.quant.GPTQ()
    for row in res.report["layers"]:
        m, n = row["out_features"], row["in_features"]
        want = gptq.stored_bits(gptq.uniform_setting(4), m, n) + DenseRotation().stored_bits(m, n)
        assert row["stored_bits"] == want


def test_quantized_in_the_rotated_basis(compressed, tiny_llama_dir):
    res, _ = compressed
    original = casp.load(tiny_llama_dir)
    mod = res.model.model.layers[0].mlp.down_proj
    assert isinstance(mod, TransformedLinear) and isinstance(mod.inner, PackedLinear)
    w = original.model.layers[0].mlp.down_proj.weight.data
    stored = mod.inner.dense_weight()
    assert (stored - w).abs().mean() > 0.5 * w.abs().mean(), "the packed weight should live in the rotated basis"
    dense = (mod(torch.eye(mod.in_features)) - 0).T
    assert (dense - w).norm() < 0.2 * w.norm(), "undoing the rotation gives back a close weight"


def test_from_pretrained_reproduces_logits_exactly(compressed):
    from transformers import AutoModelForCausalLM

    res, out = compressed
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert any(isinstance(m, TransformedLinear) for m in model.modules())
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)
