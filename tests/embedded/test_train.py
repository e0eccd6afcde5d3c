"""scripts/train_embedded.py: runs end to end, its defaults are the shipped run's, and it fails cleanly.

The training code itself is the package casp.embedded.train (tests in tests/embedded/train/).
"""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_embedded.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_embedded", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_three_steps(tmp_path):
    mod = _load_script()
    out = tmp_path / "model"
    rc = mod.main(["--out", str(out), "--steps", "3", "--batch", "2", "--eval-every", "0", "--test-scenes", "2",
                   "--threads", "1", "--vision-steps", "2", "--vision-batch", "2", "--freeze-vision",
                   "--question-draws", "2", "--question-aux-weight", "1"])
    assert rc == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test"]["n"] > 0
    assert "--freeze-vision --question-draws 2" in (out / "README.md").read_text()
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)


def test_defaults_are_the_shipped_models_training_command():
    """`python scripts/train_embedded.py --out DIR` reproduces the settings the model card reports."""
    import shlex

    from casp.embedded import EMBEDDED_MODEL_DIR

    mod = _load_script()
    card = (EMBEDDED_MODEL_DIR / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("python scripts/train_embedded.py"))
    argv = shlex.split(command)[2:]
    assert vars(mod.parse_args(argv)) == vars(mod.parse_args(["--out", "src/casp/embedded/model"]))


def test_bad_layer_is_one_line_and_writes_nothing(tmp_path, capsys):
    mod = _load_script()
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path / "m"), "--question-aux-layer", "9"])
    assert e.value.code == 2
    assert "--question-aux-layer must name a decoder layer, 1..6" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_final_evaluation_leaves_no_output(tmp_path, monkeypatch):
    from casp.embedded.train import card

    mod = _load_script()

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(card, "caption_perplexity", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        mod.main(["--out", str(tmp_path / "m"), "--steps", "1", "--batch", "2", "--eval-every", "0",
                  "--test-scenes", "1", "--threads", "1", "--vision-steps", "1", "--vision-batch", "2"])
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temp dir beside it
