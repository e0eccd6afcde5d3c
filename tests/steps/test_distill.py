"""--e2e-steps (the compressed model distilled into the original's next-token distribution) and
--finetune-steps through the whole pipeline: gains reported, bits unchanged, deterministic, saved and reloaded."""
import pytest
import torch

import casp
from casp.config import CompressionConfig
from casp.errors import CaspError
from casp.recipe import resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(scene_text, **kw):
    base = dict(bits=2.0, quantizer="e8", transform="incoherence", allocation="uniform", qk_rank=0.5,
                calib_samples=8, calib_seq_len=32, calib_text=str(scene_text),
                quantizer_options={"scale_multipliers": (1.0,)})
    return CompressionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    plain = casp.compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    tuned = casp.compress(tiny_llama_dir, out, _cfg(scene_text, finetune_steps=6, e2e_steps=6, e2e_lr=1e-2),
                          progress=False)
    again = casp.compress(tiny_llama_dir, out.parent / "again", _cfg(scene_text, finetune_steps=6, e2e_steps=6,
                                                                     e2e_lr=1e-2), progress=False)
    return plain, tuned, again, out


def test_distillation_lowers_held_out_kl_and_keeps_the_bits(runs):
    plain, tuned, _, _ = runs
    e2e = tuned.report["e2e"]
    assert e2e["steps"] == 6 and e2e["samples"] == 6 and e2e["held_out_samples"] == 1
    assert e2e["kl_after"] <= e2e["kl_before"] and e2e["kept"] == (e2e["kl_after"] < e2e["kl_before"])
    assert e2e["kept"]
    assert tuned.report["average_bits"] == plain.report["average_bits"]
    assert tuned.report["stored_bits"] == plain.report["stored_bits"]
    assert tuned.report["phase_seconds"]["e2e"] > 0
    assert "e2e" not in plain.report and plain.report["phase_seconds"]["e2e"] >= 0
    a, b = plain.model.state_dict(), tuned.model.state_dict()
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    codes = [k for k in a if "codes" in k and ".layers.0." in k]   # layer 1 saw layer 0's tuned outputs
    assert codes and all(torch.equal(a[k], b[k]) for k in codes)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("layernorm.weight"))


def test_tuned_runs_are_deterministic(runs):
    _, tuned, again, _ = runs
    a, b = tuned.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tuned.report["e2e"]["kl_after"] == again.report["e2e"]["kl_after"]


def test_a_tuned_model_saves_and_reloads_with_identical_logits(runs):
    from transformers import AutoModelForCausalLM

    _, tuned, _, out = runs
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tuned.model(ids).logits)


def test_zero_steps_never_reach_the_tuning_code(tiny_llama_dir, scene_text, monkeypatch, runs):
    import casp.steps.compress_layer as compress_layer
    from casp.steps import distill

    def refuse(*_a, **_k):
        raise AssertionError("tuning ran with zero steps")

    monkeypatch.setattr(compress_layer, "finetune_layer", refuse)
    monkeypatch.setattr(distill, "prepare", refuse)
    monkeypatch.setattr(distill, "distill", refuse)
    zero = casp.compress(tiny_llama_dir, None, _cfg(scene_text, finetune_steps=0, e2e_steps=0), progress=False)
    plain = runs[0]
    a, b = plain.model.state_dict(), zero.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_vlm_distils_through_its_own_processor(tiny_llava_dir, scene_jsonl):
    cfg = CompressionConfig(bits=2.0, quantizer="gptq", allocation="uniform", qk_rank=0, calib_samples=4,
                            calib_jsonl=str(scene_jsonl), e2e_steps=3, e2e_lr=1e-2)
    res = casp.compress(tiny_llava_dir, None, cfg, progress=False)
    e2e = res.report["e2e"]
    assert e2e["samples"] == 3 and e2e["kl_after"] <= e2e["kl_before"]


def test_bad_tuning_options_are_refused_in_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(CaspError, match="--e2e-steps"):
        resolve(CompressionConfig(e2e_steps=-1), None)
    with pytest.raises(CaspError, match="--finetune-lr"):
        resolve(CompressionConfig(finetune_lr=0), None)
    with pytest.raises(CaspError, match="cannot run with --stream"):
        resolve(CompressionConfig(e2e_steps=4, stream=True), tiny_llama_dir, out=tmp_path / "o")


def test_the_cli_takes_both_flags_for_every_quantizer():
    from casp.cli import build_parser

    for q in ("gptq", "e8", "aqlm", "rtn"):
        args = build_parser().parse_args(["compress", "-o", "x", "--quantizer", q, "--finetune-steps", "5",
                                          "--e2e-steps", "7", "--e2e-lr", "0.002"])
        assert (args.finetune_steps, args.e2e_steps, args.e2e_lr) == (5, 7, 0.002)


def test_an_old_aqlm_recipe_with_its_finetune_option_still_loads():
    from casp.recipe import Recipe

    d = resolve(CompressionConfig(quantizer="aqlm"), None).to_dict()
    d["quantizer_options"]["layer_finetune_steps"] = 9
    for k in ("finetune_steps", "finetune_lr", "e2e_steps", "e2e_lr"):
        d.pop(k)
    r = Recipe.from_dict(d)
    assert r.finetune_steps == 9 and "layer_finetune_steps" not in r.quantizer_options


def test_tuning_within_the_layer_reaches_the_matrices_before_they_are_quantized(tiny_llama_dir, scene_text):
    cfg = dict(quantizer="gptq", transform=None, quantizer_options={}, qk_rank=0, finetune_steps=8, layers=(0,))
    after = casp.compress(tiny_llama_dir, None, _cfg(scene_text, **cfg), progress=False)
    within = casp.compress(tiny_llama_dir, None, _cfg(scene_text, finetune_within=True, **cfg), progress=False)
    a, b = after.model.state_dict(), within.model.state_dict()
    first = [k for k in a if k.endswith("codes") and any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    later = [k for k in a if k.endswith("codes") and any(p in k for p in ("gate_proj", "up_proj", "down_proj"))]
    assert first and all(torch.equal(a[k], b[k]) for k in first)            # quantized before any tuning
    assert later and any(not torch.equal(a[k], b[k]) for k in later)       # quantized from tuned weights
    assert within.report["finetune"]["seconds"] > 0
    assert within.report["average_bits"] == after.report["average_bits"]


def test_image_tokens_and_padding_carry_no_distillation_loss(tiny_llava_dir):
    from casp.io.modelio import load_model
    from casp.steps.distill import text_positions

    model = load_model(tiny_llava_dir)
    image = model.config.image_token_id
    batch = {"input_ids": torch.tensor([[image, image, 5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    assert text_positions(model, batch).tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]]
