"""The training script runs end to end for a few steps and writes a loadable model directory."""

import importlib.util
import json
from pathlib import Path

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


def test_question_read_back_targets_point_at_the_answer_position():
    """The read-back loss sees each turn's last prompt token and that turn's question words."""
    mod = _load_script()
    from casp.embedded.build import build_processor

    tok = build_processor().tokenizer
    builder = mod.SequenceBuilder(tok)
    turns = [("what color is the circle ?", "red"), ("how many squares are there ?", "2")]
    ids, labels, questions = builder.build_with_questions(turns)
    assert len(questions) == 2
    for (pos, words), (q, a) in zip(questions, turns):
        assert tok.convert_ids_to_tokens(ids[pos - 1 : pos + 1]) == ["assistant", ":"]
        assert labels[pos] == -100 and labels[pos + 1] == builder.vocab[a]  # next token is the answer
        assert tok.convert_ids_to_tokens(words) == q.split()
        assert ids[pos - 2 - len(words) + 1 : pos - 1] == words


def test_question_draws_add_distinct_questions():
    import random

    mod = _load_script()
    from casp.embedded.build import build_processor

    builder = mod.SequenceBuilder(build_processor().tokenizer)
    one = mod.parse_args(["--out", "x", "--max-turns", "99", "--caption-prob", "0"])
    two = mod.parse_args(["--out", "x", "--max-turns", "99", "--caption-prob", "0", "--question-draws", "3"])
    b1 = mod.make_batch(builder, [5, 6], random.Random(0), one)
    b3 = mod.make_batch(builder, [5, 6], random.Random(0), two)
    n1 = int((b1["question_pos"] >= 0).sum())
    n3 = int((b3["question_pos"] >= 0).sum())
    assert n3 > n1
    for i in range(2):  # no question repeated within a sequence
        pos = [p for p in b3["question_pos"][i].tolist() if p >= 0]
        qs = [tuple(w for w in b3["question_words"][i, t].tolist() if w != -100) for t in range(len(pos))]
        assert len(set(qs)) == len(qs)


def _train_questions(n_scenes=60):
    """(scene, question, answer, type) over the first training scenes."""
    from casp.embedded.scenes import make_scene

    for i in range(n_scenes):
        scene = make_scene("train", i)
        for q, a, kind in scene.qa:
            yield scene, q, a, kind


def test_referent_is_the_object_a_question_names():
    mod = _load_script()
    checked = 0
    for scene, q, a, kind in _train_questions():
        o = mod.referent(scene.objects, q)
        if kind == "color":
            assert o is not None and o.color == a
        elif kind == "position":
            assert o is not None and o.quadrant == a
        elif kind == "exists":
            assert (o is not None) == (a == "yes")
        elif kind == "relation":  # the first object named
            assert o is not None and q.startswith(f"is the {o.color} {o.shape} ")
        else:
            assert o is None
        checked += 1
    assert checked > 200


def test_scene_counts_answer_every_count_question():
    mod = _load_script()
    from casp.embedded.scenes import PLURALS

    singular = {v: k for k, v in PLURALS.items()}
    for scene, q, a, kind in _train_questions():
        if kind == "count":
            counts = dict(zip(mod.COUNT_KEYS, mod.scene_counts(scene.objects)))
            key = q.split()[2]
            assert counts[singular.get(key, key)] == int(a), (q, a)


def test_second_referent_of_relation_questions():
    mod = _load_script()
    n = 0
    for scene, q, a, kind in _train_questions():
        o = mod.second_referent(scene.objects, q)
        if kind != "relation":
            assert o is None
            continue
        assert o is not None and q.endswith(f"the {o.color} {o.shape} ?")
        first = mod.referent(scene.objects, q)
        rel = "left of" if "left of" in q else "right of" if "right of" in q else "above" if "above" in q else "below"
        truth = {"left of": first.col < o.col, "right of": first.col > o.col,
                 "above": first.row < o.row, "below": first.row > o.row}[rel]
        assert truth == (a == "yes")
        n += 1
    assert n > 50


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
    import pytest

    mod = _load_script()
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path / "m"), "--question-aux-layer", "9"])
    assert e.value.code == 2
    assert "--question-aux-layer must name a decoder layer, 1..6" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_final_evaluation_leaves_no_output(tmp_path, monkeypatch):
    import pytest

    mod = _load_script()

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(mod, "caption_perplexity", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        mod.main(["--out", str(tmp_path / "m"), "--steps", "1", "--batch", "2", "--eval-every", "0",
                  "--test-scenes", "1", "--threads", "1", "--vision-steps", "1", "--vision-batch", "2"])
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temp dir beside it
