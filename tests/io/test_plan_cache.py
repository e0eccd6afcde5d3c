"""The on-disk plan cache: a second target on the same model reuses the measured plan; a changed model,
calibration file or option measures again."""
import json

import pytest

from casp.cli import main


def _compress(model, out, *extra):
    return main(["compress", str(model), "-o", str(out), "--quiet", "--json", "--calib-samples", "4",
                 "--calib-seq-len", "16", "--qk-rank", "0", *extra])


@pytest.fixture
def measured_calls(monkeypatch):
    from casp.steps import plan

    calls = []
    real = plan._measure_while_analysing
    monkeypatch.setattr(plan, "_measure_while_analysing", lambda *a: calls.append(1) or real(*a))
    return calls


def test_second_target_reuses_the_plan(tiny_llama_dir, scene_text, tmp_path, measured_calls, capsys):
    calib = ["--calib-text", str(scene_text)]
    assert _compress(tiny_llama_dir, tmp_path / "a", "--bits", "3", *calib) == 0
    assert _compress(tiny_llama_dir, tmp_path / "b", "--bits", "3.5", *calib) == 0
    assert measured_calls == [1]
    assert len(list((tmp_path / "plans").glob("*.json"))) == 1
    assert _compress(tiny_llama_dir, tmp_path / "c", "--bits", "3", "--no-plan-cache", *calib) == 0
    assert measured_calls == [1, 1]
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    c = json.loads((tmp_path / "c" / "report.json").read_text())
    assert [u["setting"] for u in a["layers"]] == [u["setting"] for u in c["layers"]]


def test_other_calibration_or_options_measure_again(tiny_llama_dir, scene_text, tmp_path, measured_calls):
    other = tmp_path / "other.txt"
    other.write_text(scene_text.read_text()[::-1])
    assert _compress(tiny_llama_dir, tmp_path / "a", "--bits", "3", "--calib-text", str(scene_text)) == 0
    assert _compress(tiny_llama_dir, tmp_path / "b", "--bits", "3", "--calib-text", str(other)) == 0
    assert _compress(tiny_llama_dir, tmp_path / "c", "--bits", "3", "--calib-text", str(scene_text), "--seed", "1") == 0
    assert measured_calls == [1, 1, 1]


def test_a_second_target_reuses_the_measured_layer_scales(tiny_llama_dir, scene_text, tmp_path, measured_calls):
    calib = ["--calib-text", str(scene_text), "--calib-samples", "16"]
    assert _compress(tiny_llama_dir, tmp_path / "a", "--bits", "3", *calib) == 0
    assert _compress(tiny_llama_dir, tmp_path / "b", "--bits", "3.5", *calib) == 0
    assert measured_calls == [1]
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["recipe"]["damage"] == "measured" and a["layer_scales"] == b["layer_scales"] and a["layer_scales"]


def test_a_kept_plan_reads_back_equal_without_unpickling(tmp_path):
    """JSON plus safetensors: units, ranks, Fisher and joint Q/K tables (settings rebuilt as the registered type)."""
    import torch

    from casp.io.plan_cache import PlanCache
    from casp.quant.e8 import E8Setting
    from casp.steps.joint import QKOption
    from casp.steps.measured import Measured
    from casp.steps.units import Role, Unit, UnitKey

    units = [Unit(0, "self_attn.q_proj", Role.DENSE, "attn_in", 8, 8, 64, "q", 0, {"e8p-2b": 1.5, "e8p-3b": 0.25})]
    tables = {UnitKey(0, "self_attn.q_proj"): {"dense:e8p-2b": (QKOption(0, E8Setting(2)), 160, 1.5),
                                                 "r4:e8p-3b": (QKOption(4, E8Setting(3)), 200, 0.5)}}
    m = Measured([{"q": 0, "k": 0}], units, {"model.layers.0.self_attn.q_proj": torch.arange(8.0)}, tables,
                 layer_scales={0: [(3.148, 0.25)]}, scale_trust={"e8p-3b": 0.5},
                 type_scales={"self_attn.q_proj": 0.8, "mlp.down_proj": 1.25}, type_trust={"e8p-3b": 0.9})
    cache = PlanCache(tmp_path)
    cache["k"] = m
    assert "k" in cache and "other" not in cache
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    back = cache["k"]
    assert back.ranks == m.ranks and back.units == m.units and back.qk_tables == m.qk_tables
    assert back.layer_scales == m.layer_scales and back.scale_trust == m.scale_trust
    assert back.type_scales == m.type_scales and back.type_trust == m.type_trust
    assert torch.equal(back.fisher["model.layers.0.self_attn.q_proj"], torch.arange(8.0))
    with pytest.raises(KeyError):
        cache["other"]


def test_a_transform_that_measures_as_another_shares_its_plan(tiny_llama_dir, scene_text, tmp_path, measured_calls):
    """incoherence-scaled builds incoherence's rotation: its run reuses that plan and allocates exactly as
    if it had measured its own, paying for its fp16 sides within the same target."""
    calib = ["--calib-text", str(scene_text), "--bits", "3.5"]
    assert _compress(tiny_llama_dir, tmp_path / "a", "--transform", "incoherence", *calib) == 0
    assert _compress(tiny_llama_dir, tmp_path / "b", "--transform", "incoherence-scaled", *calib) == 0
    assert measured_calls == [1]
    assert _compress(tiny_llama_dir, tmp_path / "c", "--transform", "incoherence-scaled", "--no-plan-cache", *calib) == 0
    assert measured_calls == [1, 1]
    a, b, c = (json.loads((tmp_path / d / "report.json").read_text()) for d in "abc")
    assert [u["setting"] for u in b["layers"]] == [u["setting"] for u in c["layers"]]
    for measured_here in (a, c):   # the measuring's parts are timed only by the run that measured
        assert {"fisher", "measure"} <= set(measured_here["plan_seconds"])
        assert 0 < sum(measured_here["plan_seconds"].values()) <= measured_here["phase_seconds"]["plan_and_allocate"]
    assert "plan_seconds" not in b
    assert b["average_bits"] == c["average_bits"] <= 3.5
    assert sum(u["stored_bits"] for u in a["layers"]) != sum(u["stored_bits"] for u in b["layers"])
