"""The training script runs end to end for a few steps and writes a loadable model directory."""

import importlib.util
import json
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_embedded.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_embedded", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_three_steps(tmp_path):
    mod = _load_script()
    out = tmp_path / "model"
    rc = mod.main(["--out", str(out), "--steps", "3", "--batch", "2", "--eval-every", "0", "--test-scenes", "2",
                   "--threads", "1"])
    assert rc == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test"]["n"] > 0
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)


def test_sequence_builder_matches_processor():
    """The training token layout equals what the processor produces for the first turn."""
    mod = _load_script()
    from casp.embedded.build import build_processor
    from casp.embedded.scenes import make_scene
    from casp.eval.vqa import build_prompt

    proc = build_processor()
    scene = make_scene("train", 0)
    q, a, _ = scene.qa[0]
    ids, labels = mod.SequenceBuilder(proc.tokenizer).build([(q, a)])
    enc = proc(text=[build_prompt(proc, q) + " " + a + "</s>"], images=[scene.image])
    assert ids == enc["input_ids"][0]
    n_answer = len(a.split()) + 1
    assert [x for x in labels if x != -100] == ids[-n_answer:]
    pix = mod.scene_pixels(scene.pixels)
    ref = proc.image_processor(scene.image, return_tensors="pt")["pixel_values"][0]
    assert (pix - ref).abs().max() < 1e-5
