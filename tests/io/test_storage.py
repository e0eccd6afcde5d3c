"""compress -> save -> load: logits, bit accounting against bytes on disk, determinism, HF loading."""
import hashlib

import pytest
import torch

import casp
from casp.config import CompressionConfig
from stored_bytes import linear_bytes_on_disk
from casp.nn.lowrank_linear import LowRankLinear
from casp.nn.packed_linear import PackedLinear
from casp.pipeline import compress


def _cfg(**kw):
    base = dict(bits=3.0, calib_samples=8, calib_seq_len=32, seed=0)
    base.update(kw)
    return CompressionConfig(**base)


def _ids(vocab=40, n=16):
    return torch.randint(5, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    res = compress(tiny_llama_dir, out, _cfg(calib_text=str(scene_text), qk_rank=0.25), progress=False)
    return res, out


def test_roundtrip_logits_equal(compressed):
    res, out = compressed
    ids = _ids()
    with torch.no_grad():
        want = res.model(ids).logits
        got = casp.load(out)(ids).logits
    assert torch.equal(want, got)


def test_transformers_from_pretrained_after_import_casp(compressed):
    from transformers import AutoModelForCausalLM

    res, out = compressed
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, res.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_report_bits_match_bytes_on_disk(compressed):
    res, out = compressed
    r = res.report
    assert r["stored_bytes"] * 8 == r["stored_bits"]
    assert linear_bytes_on_disk(out) * 8 == r["stored_bits"]
    n_orig = sum(p.numel() for n, p in casp.load(res.source).named_parameters() if ".layers." in n and "_proj" in n and n.endswith("weight"))
    assert r["original_weights"] == n_orig
    assert r["average_bits"] == pytest.approx(r["stored_bits"] / n_orig)
    assert r["average_bits"] <= 3.0
    assert {"name", "bits", "group_size", "rank"} <= set(r["layers"][0])
    assert (out / "report.md").is_file() and (out / "bits_per_layer.png").is_file()


def test_lowrank_installed_and_saved(compressed):
    _, out = compressed
    model = casp.load(out)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and isinstance(attn.k_proj, LowRankLinear)
    assert isinstance(attn.q_proj.down, PackedLinear)


def test_same_seed_gives_identical_bytes(tiny_llama_dir, scene_text, tmp_path):
    digests = []
    for name in ("a", "b"):
        compress(tiny_llama_dir, tmp_path / name, _cfg(calib_text=str(scene_text), calib_samples=4), progress=False)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_lowrank_only_keeps_quarter_of_qk(tiny_llama_dir, scene_text, tmp_path):
    res = compress(tiny_llama_dir, tmp_path / "lr", _cfg(quantizer="none", qk_rank=0.25, calib_text=str(scene_text)),
                   progress=False)
    orig = casp.load(tiny_llama_dir)
    for i, layer in enumerate(res.model.model.layers):
        for p in ("q_proj", "k_proj"):
            lr = getattr(layer.self_attn, p)
            dense = getattr(orig.model.layers[i].self_attn, p).weight
            assert isinstance(lr, LowRankLinear)
            assert lr.rank * (lr.in_features + lr.out_features) <= 0.25 * dense.numel() + lr.in_features + lr.out_features
    loaded = casp.load(tmp_path / "lr")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model(ids).logits)


def test_export_dense_loads_in_plain_transformers(compressed, tmp_path):
    from transformers import LlamaForCausalLM

    from casp.io.storage import export_dense

    res, out = compressed
    export_dense(out, tmp_path / "dense")
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert not any(isinstance(m, (PackedLinear, LowRankLinear)) for m in dense.modules())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, res.model(ids).logits, rtol=2e-2, atol=2e-2)


def test_vlm_roundtrip_with_jsonl_calibration(tiny_llava_dir, scene_jsonl, tmp_path):
    res = compress(tiny_llava_dir, tmp_path / "v", _cfg(calib_jsonl=str(scene_jsonl), bits=2.5), progress=False)
    loaded = casp.load(tmp_path / "v")
    from casp.data.calibration import image_text_batches, read_calibration_jsonl
    from casp.io.modelio import load_processor

    batch = image_text_batches(load_processor(tiny_llava_dir), read_calibration_jsonl(scene_jsonl)[:1])[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, res.model(**batch).logits)
    assert res.report["average_bits"] <= 2.5
    assert (tmp_path / "v" / "preprocessor_config.json").exists() or (tmp_path / "v" / "processor_config.json").exists()


def test_load_reads_the_generation_config(compressed, tmp_path):
    """Stop tokens live in generation_config.json; `casp eval OUT` generates answers with them."""
    import shutil

    from transformers import GenerationConfig

    _, out = compressed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0).save_pretrained(copy)
    loaded = casp.load(copy)
    assert loaded.generation_config.eos_token_id == [2, 7]
    assert loaded.generation_config.pad_token_id == 0
