"""casp.eval.vqa: prompts, JSONL loading, accuracy, caption perplexity and KL."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from casp.embedded.scenes import generate_caption_records, generate_records, write_jsonl
from casp.eval.vqa import (
    build_prompt,
    caption_perplexity,
    kl_vs_reference,
    load_vqa_jsonl,
    normalize_answer,
    vqa_accuracy,
)


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_dir)


class _NoTemplate:
    chat_template = None
    image_token = "<image>"


def test_build_prompt_template_and_fallback(tiny):
    _, processor = tiny
    assert build_prompt(processor, "is there a red circle ?") == "USER: <image>\nis there a red circle ? ASSISTANT:"
    assert build_prompt(_NoTemplate(), "Q?") == "USER: <image>\nQ? ASSISTANT:"


def test_normalize_answer():
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("Top  Left!") == "top left"


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl("test", 3, tmp_path)
    records = load_vqa_jsonl(path)
    expected = generate_records("test", 3)
    assert [(r["question"], r["answer"], r["type"]) for r in records] == [
        (r["question"], r["answer"], r["type"]) for r in expected
    ]
    assert np.array_equal(np.asarray(records[0]["image"]), np.asarray(expected[0]["image"]))
    # absolute paths and missing "type" are accepted
    row = json.loads(path.read_text().splitlines()[0])
    other = tmp_path / "sub" / "abs.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps({"image": str(tmp_path / row["image"]), "question": "q", "answer": "a"}) + "\n")
    (rec,) = load_vqa_jsonl(other)
    assert rec["type"] == "all" and rec["image"].size == (64, 64)


def test_jsonl_bad_image_names_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "broken.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="broken.png") as info:
        load_vqa_jsonl(path)
    assert "\n" not in str(info.value)
    path.write_text(json.dumps({"image": "missing.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing.png"):
        load_vqa_jsonl(path)
    path.write_text(json.dumps({"image": "broken.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="data.jsonl:1"):
        load_vqa_jsonl(path)


def test_vqa_accuracy_shape(tiny):
    model, processor = tiny
    records = generate_records("validation", 2)
    res = vqa_accuracy(model, processor, records, batch_size=4, progress=False)
    assert res["n"] == len(records)
    assert 0.0 <= res["vqa_accuracy"] <= 1.0
    assert set(res["per_type"]) == {r["type"] for r in records}


def test_caption_perplexity_and_kl(tiny):
    model, processor = tiny
    caps = generate_caption_records("validation", 3)
    ppl = caption_perplexity(model, processor, caps, batch_size=2, progress=False)
    vocab = len(processor.tokenizer)
    assert math.isfinite(ppl) and 1.0 < ppl < 10 * vocab
    assert kl_vs_reference(model, model, processor, caps, progress=False) == pytest.approx(0.0, abs=1e-9)
    other = LlavaForConditionalGeneration.from_pretrained(processor_dir(model)).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert kl_vs_reference(other, model, processor, caps, progress=False) > 1e-4


def processor_dir(model):
    return model.config._name_or_path
