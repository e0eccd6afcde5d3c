"""The baseline check: an allocated run measures itself against the uniform setting and keeps the better."""
import json

import pytest
import torch

import casp.pipeline as pipeline
from casp.config import CompressionConfig
from casp.pipeline import compress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(scene_text, **kw):
    base = dict(bits=3.25, qk_rank=0, calib_samples=16, calib_seq_len=32, calib_text=str(scene_text))
    return CompressionConfig(**{**base, **kw})


def _flipped(monkeypatch):
    """The measured damage table with its signs flipped: the allocator then spends bits where they hurt."""
    honest = pipeline.plan_ranks_and_units

    def flipped(run, batches, held=()):
        measured = honest(run, batches, held)
        for u in measured.units:
            u.distortion = {k: -v for k, v in u.distortion.items()}
        return measured

    monkeypatch.setattr(pipeline, "plan_ranks_and_units", flipped)


def test_a_bad_allocation_is_caught_and_the_uniform_model_saved(tiny_llama_dir, scene_text, tmp_path, monkeypatch):
    from casp.io.storage import load_compressed

    _flipped(monkeypatch)
    res = compress(tiny_llama_dir, tmp_path / "out", _cfg(scene_text), progress=False)
    check = res.report["baseline_check"]
    assert check["kept"] == "uniform" and check["uniform_kl"] < check["allocation_kl"]
    assert check["samples"] == 2 and check["uniform_setting"] == "3b-g128"
    assert {u["setting"] for u in res.report["layers"]} == {"3b-g128"}
    assert res.report["average_bits"] == pytest.approx(check["uniform_bits"]) and res.report["average_bits"] <= 3.25
    assert "baseline_check" in res.report["phase_seconds"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["baseline_check"]["kept"] == "uniform"
    ids = torch.randint(5, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "out")(ids).logits, res.model(ids).logits)


@pytest.mark.parametrize("inputs", ["own", "auto"])
def test_the_kept_uniform_model_is_the_uniform_run_on_the_same_samples(tiny_llama_dir, scene_text, monkeypatch, inputs):
    """`own`: each uniform layer is calibrated on the uniform model's own hidden states, not the allocated
    model's, so what the check keeps is the model `--allocation uniform` stores from the same samples. `auto`
    gets there too: the flipped allocation does not beat the shared-input uniform model by its margin, so that
    model is rebuilt on its own inputs from the original weights."""
    from casp.data.calibration import hold_out

    _flipped(monkeypatch)
    checked = compress(tiny_llama_dir, None, _cfg(scene_text, check_inputs=inputs), progress=False)
    report = checked.report["baseline_check"]
    assert report["inputs"] == "own"
    assert ("shared_uniform_kl" in report) == (inputs == "auto") and report["kept"] == "uniform"
    monkeypatch.undo()
    honest = pipeline.calibrate
    monkeypatch.setattr(pipeline, "calibrate", lambda run: hold_out(honest(run), 2)[0])
    uniform = compress(tiny_llama_dir, None, _cfg(scene_text, allocation="uniform", bits=3), progress=False)
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(checked.model(ids).logits, uniform.model(ids).logits)


def test_shared_inputs_reuse_the_allocated_units_at_the_uniform_setting_exactly(tiny_llama_dir, scene_text):
    """On the first compressed layer both modes calibrate on the same inputs, so the shared mode's reused modules
    must give the very uniform model that the own mode codes in full."""
    shared = compress(tiny_llama_dir, None, _cfg(scene_text, layers=(0,), check_inputs="shared"), progress=False)
    own = compress(tiny_llama_dir, None, _cfg(scene_text, layers=(0,), check_inputs="own"), progress=False)
    s, o = shared.report["baseline_check"], own.report["baseline_check"]
    at_uniform = sum(u["setting"] == s["uniform_setting"] for u in shared.report["layers"])
    assert s["inputs"] == "shared" and s["reused_units"] == at_uniform > 0
    assert o["inputs"] == "own" and o["reused_units"] == 0
    assert s["uniform_kl"] == o["uniform_kl"] and s["allocation_kl"] == o["allocation_kl"]


def test_shared_inputs_reuse_only_what_the_layer_stores_dense(tiny_llama_dir, scene_text, monkeypatch):
    """A joint Q/K allocation also sets the dense key of a projection it stores as factors; that projection is
    still coded dense for the uniform model, never taken from the allocation."""
    from casp.steps.units import Role, UnitKey

    honest = pipeline.plan_and_allocate

    def with_dense_keys(run, batches, held):
        plan = honest(run, batches, held)
        uniform = run.codec.uniform_setting(3)
        for u in plan.units:
            if u.role is Role.DOWN:
                plan.settings[UnitKey(u.layer, u.module)] = uniform
        return plan

    monkeypatch.setattr(pipeline, "plan_and_allocate", with_dense_keys)
    res = compress(tiny_llama_dir, None, _cfg(scene_text, qk_rank=0.25, check_inputs="shared"), progress=False)
    check = res.report["baseline_check"]
    assert check["uniform_setting"] == "3b-g128" and check["uniform_kl"] > 0
    stored_dense_at_uniform = sum(u["setting"] == "3b-g128" and not u["rank"] for u in res.report["layers"])
    assert check["reused_units"] == stored_dense_at_uniform


def test_the_better_allocation_is_kept_with_both_figures(tiny_llama_dir, scene_text):
    """CASP's joint ranks and bits beat uniform 3-bit on this model and data: the allocation stays, low-rank Q/K too."""
    res = compress(tiny_llama_dir, None, _cfg(scene_text, qk_rank=None), progress=False)
    check = res.report["baseline_check"]
    assert check["kept"] == "allocation" and check["allocation_kl"] <= check["uniform_kl"]
    assert any(u["rank"] for u in res.report["layers"])
    assert check["kept_bits"] == pytest.approx(res.report["average_bits"])
    assert 0 < check["share_of_run"] < 1
    assert any(u["setting"] != "3b-g128" for u in res.report["layers"])


def test_the_check_holds_its_samples_out_of_fitting_and_can_be_turned_off(tiny_llama_dir, scene_text):
    on = compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    off = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=0), progress=False)
    assert on.recipe.check_samples == 2 and "one calibration sample in 8" in on.recipe.reasons["check_samples"]
    assert off.recipe.check_samples == 0 and "baseline_check" not in off.report
    assert on.report["calibration"]["tokens"] == off.report["calibration"]["tokens"] * 14 // 16
    uniform = compress(tiny_llama_dir, None, _cfg(scene_text, allocation="uniform", bits=3), progress=False)
    assert uniform.recipe.check_samples == 0 and "baseline_check" not in uniform.report


def test_no_uniform_setting_under_the_target_means_no_check(tiny_llama_dir, scene_text):
    """At 2.14 bits the uniform 2-bit g128 setting (2.15 bits a weight here) does not fit: nothing to compare with."""
    res = compress(tiny_llama_dir, None, _cfg(scene_text, bits=2.14), progress=False)
    assert res.report["baseline_check"] == {"kept": "allocation",
                                            "skipped": "the uniform setting needs more bits than the target"}


def test_the_command_line_says_when_the_uniform_model_was_kept(tiny_llama_dir, scene_text, tmp_path, monkeypatch,
                                                               capsys):
    from casp.cli import main

    _flipped(monkeypatch)
    args = ["compress", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--bits", "3.25", "--qk-rank", "0",
            "--calib-text", str(scene_text), "--calib-samples", "16", "--calib-seq-len", "32", "--check-inputs", "shared"]
    assert main([*args, "--quiet"]) == 0
    assert "so the uniform model was kept" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "j"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline_check"]["kept"] == "uniform"
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Baseline check on 2 held-out samples" in md and "calibrated on the allocated run's inputs" in md


def test_a_vector_quantizer_at_a_fractional_target_is_checked_against_its_floor(tiny_llama_dir, scene_text):
    """E8 has whole-bit settings only: at 2.5 bits the uniform alternative is E8 at 2 bits, not an error."""
    res = compress(tiny_llama_dir, None, _cfg(scene_text, bits=2.5, quantizer="e8", layers=(0,)), progress=False)
    check = res.report["baseline_check"]
    assert check["uniform_setting"] == "e8p-2b" and check["uniform_bits"] <= 2.5
    assert check["kept"] in ("allocation", "uniform")
