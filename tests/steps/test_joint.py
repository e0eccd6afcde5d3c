"""--qk-rank joint: Q/K ranks and bit settings chosen under one budget, never worse than allocation alone."""
import pytest
import torch

import casp
from casp.config import CompressionConfig
from casp.steps.joint import QKOption, option_cost, qk_options
from casp.steps.units import Role, Unit


def _cfg(scene_text, **kw):
    base = dict(bits=3.0, quantizer="gptq", qk_rank="joint", calib_samples=8, calib_seq_len=32,
                calib_text=str(scene_text))
    base.update(kw)
    return CompressionConfig(**base)


@pytest.mark.parametrize("bits", [2.0, 2.2, 3.0, 4.3])
def test_joint_never_worse_than_allocation_alone_and_within_budget(tiny_llama_dir, scene_text, bits):
    res = casp.compress(tiny_llama_dir, None, _cfg(scene_text, bits=bits), progress=False)
    j = res.report["joint_allocation"]
    alone = j["objective_allocation_alone"]
    assert alone is None or j["objective_joint"] <= alone or j["kept"] == "allocation alone"
    assert res.report["average_bits"] <= bits


def test_joint_saves_and_reloads(tiny_llama_dir, scene_text, tmp_path):
    res = casp.compress(tiny_llama_dir, tmp_path / "out", _cfg(scene_text, bits=2.5), progress=False)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(casp.load(tmp_path / "out")(ids).logits, res.model(ids).logits)
    ranks = [(lr["rank_q"], lr["rank_k"]) for lr in res.report["decoder_layers"]]
    assert all(r >= 0 for pair in ranks for r in pair)


def test_options_include_dense_and_cost_exactly():
    gptq = casp.quant.GPTQ()
    u = Unit(0, "self_attn.q_proj", Role.DENSE, "attn_in", 128, 128, 128 * 128, "q")
    opts = qk_options(u, gptq.candidates(), (0.5, 0.25, 0.125), rank_multiple=8)
    assert {o.rank for o in opts} == {0, 32, 16, 8}
    assert all(o.rank % 8 == 0 for o in opts)
    s = gptq.candidates()[0]
    assert option_cost(u, QKOption(0, s), gptq) == gptq.stored_bits(s, 128, 128)
    assert option_cost(u, QKOption(16, s), gptq) == gptq.stored_bits(s, 16, 128) + gptq.stored_bits(s, 128, 16)


def test_joint_needs_rd_and_a_quantizer():
    with pytest.raises(casp.CaspError, match="joint"):
        CompressionConfig(qk_rank="joint", allocation="uniform").validate()
    with pytest.raises(casp.CaspError, match="joint"):
        CompressionConfig(qk_rank="joint", quantizer="none").validate()


def test_one_whitened_svd_per_projection_serves_every_rank(tiny_llama_dir, scene_text, monkeypatch):
    from casp.algorithms import lowrank
    from casp.steps import joint

    calls = []
    real = lowrank.whitened_svd
    monkeypatch.setattr(joint, "whitened_svd", lambda w, h: calls.append(tuple(w.shape)) or real(w, h))
    res = casp.compress(tiny_llama_dir, None, _cfg(scene_text, bits=2.5), progress=False)
    qk_units = 2 * len(res.report["decoder_layers"])
    assert len(calls) == qk_units
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 32, generator=g), torch.randn(200, 32, generator=g)
    svd = real(w, x.T @ x)
    for r in (4, 8, 16):
        for got, want in zip(svd.factors(r), lowrank.whitened_lowrank(w, x.T @ x, r)):
            assert torch.equal(got, want)
