"""The shipped embedded model: loads offline, has the contracted shape, and answers well."""

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from casp.embedded import EMBEDDED_MODEL_DIR, load_embedded_model, load_embedded_processor
from casp.embedded.build import NUM_VISUAL_TOKENS
from casp.embedded.scenes import generate_records
from casp.eval.vqa import build_prompt, vqa_accuracy


@pytest.fixture(scope="module")
def model():
    return load_embedded_model()


@pytest.fixture(scope="module")
def processor():
    return load_embedded_processor()


def test_files_shipped_and_small():
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "README.md"):
        assert (EMBEDDED_MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 2**20


def test_loads_offline_with_plain_hf_calls(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, attn_implementation="eager")
    p = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    assert m.dtype == torch.float32 or m.dtype == torch.float16
    assert p.tokenizer.image_token == "<image>"


def test_architecture_contract(model):
    cfg = model.config
    text = cfg.text_config
    assert text.model_type == "llama" and text.hidden_size >= 256 and text.num_hidden_layers >= 6
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
    assert cfg.vision_config.model_type == "clip_vision_model"
    assert cfg.projector_hidden_act == "gelu"
    assert cfg.image_seq_length == NUM_VISUAL_TOKENS >= 64


def test_processor_matches_visual_tokens_and_share(processor):
    record = generate_records("test", 1)[0]
    prompt = build_prompt(processor, record["question"])
    assert prompt == f"USER: <image>\n{record['question']} ASSISTANT:"
    enc = processor(text=[prompt + " " + record["answer"]], images=[record["image"]], return_tensors="pt")
    n_image = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_image == NUM_VISUAL_TOKENS
    assert n_image / enc["input_ids"].shape[1] >= 0.75
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)


def test_eager_and_sdpa_agree(processor):
    rec = generate_records("test", 2)[:3]
    enc = processor(text=[build_prompt(processor, r["question"]) for r in rec], images=[r["image"] for r in rec],
                    return_tensors="pt", padding=True)
    outs = []
    for impl in ("eager", "sdpa"):
        m = load_embedded_model(attn_implementation=impl)
        with torch.no_grad():
            outs.append(m(**enc).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-3)


TARGET_ACCURACY = 0.95


@pytest.fixture(scope="module")
def accuracy_200(model, processor):
    records = generate_records("test", 40)[:200]
    assert len(records) == 200
    return vqa_accuracy(model, processor, records, batch_size=100, progress=False)


def test_accuracy_matches_model_card(accuracy_200):
    """Regression: the shipped weights reproduce the accuracy their card reports (200-question subset)."""
    card = json.loads((EMBEDDED_MODEL_DIR / "metrics.json").read_text())
    assert accuracy_200["n"] == 200
    assert abs(accuracy_200["vqa_accuracy"] - card["test"]["vqa_accuracy"]) < 0.06, accuracy_200


def test_accuracy_reaches_target(accuracy_200):
    assert accuracy_200["vqa_accuracy"] >= TARGET_ACCURACY, accuracy_200
