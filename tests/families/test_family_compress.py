"""The families added with Gemma 3: compress a tiny model at 3 bits, save, reload with transformers, generate.

Gemma 3 and Idefics3 (SmolVLM) calibrate on images through a tiny processor of their own;
LLaVA-OneVision, InternVL and SmolVLM2, whose processors need torchvision for their video part, and
the causal LMs calibrate on text through a word-level tokenizer (see `tiny_models.PROCESSORS`).
Only decoder-layer linears are compressed: vision tower, projector and embeddings stay 16-bit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import casp
from casp.config import CompressionConfig
from casp.models.adapters import adapter_for
from casp.nn import MODULE_TYPES
from casp.nn.lowrank_linear import LowRankLinear
from casp.pipeline import compress
from tiny_models import PROCESSORS, tiny_image_batch, tiny_model, tiny_processor

FAMILIES = ["gemma3", "idefics3", "smolvlm", "llava_onevision", "internvl", "gemma3_text", "qwen3", "phi3"]
FUSED_QKV = {"phi3"}   # low-rank Q/K is refused there: compressed with --qk-rank 0


def config_for(family: str, scene_jsonl: Path, scene_text: Path) -> CompressionConfig:
    """3 bits with low-rank Q/K at a quarter of the weights (dense fused W_qkv for Phi-3)."""
    calib = dict(calib_jsonl=str(scene_jsonl)) if family in PROCESSORS else dict(calib_text=str(scene_text))
    return CompressionConfig(bits=3.0, qk_rank=0 if family in FUSED_QKV else 0.25, calib_samples=8,
                             calib_seq_len=32, seed=0, **calib)


def compress_family(family: str, root: Path, scene_jsonl: Path, scene_text: Path):
    """Save the tiny model and its processor under `root`, compress it to root/out; (result, out)."""
    src = root / "src"
    model, processor = tiny_model(family), tiny_processor(family)
    model.save_pretrained(src)
    processor.save_pretrained(src)
    given = None if family in PROCESSORS else processor
    res = compress(src, root / "out", config_for(family, scene_jsonl, scene_text), processor=given, progress=False)
    return res, root / "out"


def decoder_linear_bytes_on_disk(out: Path) -> int:
    """Bytes of the stored tensors of decoder-layer linears (vision-tower layers excluded)."""
    total = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if ".layers." in key and "_proj." in key and "vision" not in key and not key.endswith(".bias"):
                    t = st.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module", params=FAMILIES)
def compressed(request, one_torch_thread, scene_jsonl, scene_text, tmp_path_factory):
    family = request.param
    res, out = compress_family(family, tmp_path_factory.mktemp(family), scene_jsonl, scene_text)
    return family, res, out


def _prompt(family: str, model) -> dict:
    batch = tiny_image_batch(model, seed=3)
    return batch if batch is not None else {"input_ids": torch.tensor([[2, 20, 31, 44, 12]])}


def test_stored_bits_equal_bytes_on_disk(compressed):
    family, res, out = compressed
    r = res.report
    assert r["stored_bytes"] * 8 == r["stored_bits"]
    assert decoder_linear_bytes_on_disk(out) * 8 == r["stored_bits"], family
    assert r["average_bits"] <= 3.0


def test_from_pretrained_after_import_casp_generates(compressed):
    family, res, out = compressed
    assert casp.__name__ == "casp"
    cls = getattr(tf, type(res.model).__name__)
    loaded = cls.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    batch = _prompt(family, loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, res.model(**batch).logits, rtol=1e-4, atol=1e-4)
        tokens = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == batch["input_ids"].shape[1] + 3


def test_only_decoder_linears_are_compressed(compressed):
    """Every decoder linear is a casp module; the vision tower, projector and embeddings are plain fp16 tensors."""
    family, res, out = compressed
    model = casp.load(out)
    adapter = adapter_for(model)
    prefix = adapter.layers + "."
    casp_modules = [n for n, m in model.named_modules() if isinstance(m, tuple(MODULE_TYPES.values()))]
    assert casp_modules and all(n.startswith(prefix) for n in casp_modules)
    for layer in adapter.decoder_layers(model):
        for name in adapter.linear_names():
            assert isinstance(layer.get_submodule(name), tuple(MODULE_TYPES.values())), (family, name)
        q = layer.get_submodule(adapter.qk_name("q"))
        assert isinstance(q, LowRankLinear) == (family not in FUSED_QKV)
    dense = [adapter.embed_tokens] + [p for p in (adapter.vision_tower, adapter.projector) if p]
    for path in dense:
        params = list(model.get_submodule(path).parameters())
        assert params and not any(isinstance(m, tuple(MODULE_TYPES.values())) for m in model.get_submodule(path).modules())
    with safe_open(next(out.glob("*.safetensors")), "pt") as st:
        floats = {st.get_tensor(k).dtype for k in st.keys() if "vision" in k or "embed_tokens" in k}
    assert floats == {torch.float16}
