"""Checkpoints in the transformers 5 and 4 on-disk formats load with their RoPE base, weights and tokens.

Each directory is written in code in one format whatever transformers is installed: config.json with
`rope_parameters` (5.x) or top-level `rope_theta` (4.x), both with a base of 100000; tokenizer files
naming `TokenizersBackend` with a list-valued `extra_special_tokens` (5.x) or the generic fast class
with `additional_special_tokens` (4.x); the LLaVA image processor inside processor_config.json (5.x) or
in preprocessor_config.json (4.x); and the CLIP tower's tensors without (5.x) or with (4.x) its
`vision_model.` level. Without casp's compatibility layer 4.57 loads the 5.x directory with a base of
10000 and fails on its tokenizer; the tests run under whichever version is installed.
"""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import casp
from casp.config import CompressionConfig
from casp.io.hf_compat import apply_rope_parameters, rope_bases, tokenizer_config_fixes
from casp.io.modelio import load_model, load_processor, tokenizer_of
from casp.models.adapters import adapter_for
from casp.pipeline import compress

BASE = 100000.0
EXTRA = ["<extra_0>", "<extra_1>"]
SAMPLE = "USER: <image>\nwhat color is the circle ? <extra_1> ASSISTANT: red"
SPECIALS = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _backend():
    """The embedded word-level tokenizer plus two extra special tokens (a `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer

    from casp.embedded.tokenizer import build_tokenizer

    backend = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(EXTRA)
    return backend


def _fast_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_backend(), **SPECIALS)


def _tokenizer_config(fmt: str, processor_class: str | None) -> dict:
    if fmt == "v5":
        cfg = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "extra_special_tokens": EXTRA,
               "model_specific_special_tokens": {"image_token": "<image>"}, "image_token": "<image>"}
    else:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": EXTRA,
               "extra_special_tokens": {"image_token": "<image>"}}
    cfg.update(SPECIALS, clean_up_tokenization_spaces=False, model_max_length=512, padding_side="left")
    if processor_class:
        cfg["processor_class"] = processor_class
    return cfg


def _set_rope(raw: dict, fmt: str) -> None:
    """Give the (text) config a RoPE base of BASE in the format's own fields only."""
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        raw.pop(key, None)
    if fmt == "v5":
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": BASE}
    else:
        raw.update(rope_theta=BASE, rope_scaling=None)


def _rewrite_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _tower_layout(d, fmt: str) -> None:
    """The CLIP tower's tensors under `vision_tower.` (5.x) or `vision_tower.vision_model.` (4.x)."""
    file = d / "model.safetensors"
    sd = load_file(file)
    flat = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in sd.items()}
    if fmt == "v4":
        flat = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
                for k, v in flat.items()}
    save_file(flat, file, metadata={"format": "pt"})


def _processor_layout(d, fmt: str) -> None:
    """The image processor's settings inside processor_config.json (5.x) or in preprocessor_config.json (4.x)."""
    proc, pre = d / "processor_config.json", d / "preprocessor_config.json"
    merged = json.loads(proc.read_text()) if proc.is_file() else {}
    image = merged.pop("image_processor", None) or json.loads(pre.read_text())
    pre.unlink(missing_ok=True)
    if fmt == "v5":
        merged["image_processor"] = image
    else:
        pre.write_text(json.dumps(image, indent=2))
    merged["processor_class"] = "LlavaProcessor"
    proc.write_text(json.dumps(merged, indent=2))


def _write_format(d, fmt: str, text_key: str | None, processor_class: str | None) -> None:
    def config(raw):
        _set_rope(raw[text_key] if text_key else raw, fmt)
        raw["transformers_version"] = "5.24.0" if fmt == "v5" else "4.57.6"

    _rewrite_json(d / "config.json", config)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (d / name).unlink(missing_ok=True)
    _backend().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(fmt, processor_class), indent=2))


def _rope_in_memory(text_config) -> None:
    """Build the reference model itself with base BASE, under either version's config fields."""
    text_config.rope_theta = BASE
    if isinstance(getattr(text_config, "rope_parameters", None), dict):
        text_config.rope_parameters["rope_theta"] = BASE


def _llava_batch(vocab: dict) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.tensor([[vocab["<s>"]]]), torch.full((1, 64), vocab["<image>"]),
                     torch.randint(5, 50, (1, 6), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


@pytest.fixture(scope="module", params=["v5", "v4"])
def llava_dir(request, tmp_path_factory):
    """A tiny LLaVA in one format, and its logits on an image batch before saving."""
    from casp.embedded.build import build_config, build_model, build_processor

    fmt = request.param
    d = tmp_path_factory.mktemp(f"llava_{fmt}")
    tok = _fast_tokenizer()
    cfg = build_config(tok, vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2,
                       lm_hidden=64, lm_intermediate=96, lm_layers=2, lm_heads=4, lm_kv_heads=2)
    _rope_in_memory(cfg.text_config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = _llava_batch(tok.get_vocab())
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(d)
    build_processor(tok).save_pretrained(d)
    _write_format(d, fmt, "text_config", "LlavaProcessor")
    _processor_layout(d, fmt)
    _tower_layout(d, fmt)
    return d, batch, logits


@pytest.fixture(scope="module", params=["v5", "v4"])
def llama_dir(request, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    fmt = request.param
    d = tmp_path_factory.mktemp(f"llama_{fmt}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=_backend().get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(d)
    _write_format(d, fmt, None, None)
    return d


def _inv_freq(base: float, head_dim: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _assert_rope_base(model) -> None:
    adapter = adapter_for(model)
    assert rope_bases(adapter.text_config(model)) == [BASE]
    _, _, head_dim = adapter.attention_geometry(model)
    inv = model.get_submodule(adapter.rotary).inv_freq
    torch.testing.assert_close(inv, _inv_freq(BASE, head_dim))
    assert not torch.allclose(inv, _inv_freq(10000.0, head_dim))


def _assert_tokens(tokenizer) -> None:
    backend = _backend()
    want = backend.encode(SAMPLE).ids
    assert tokenizer(SAMPLE).input_ids == want
    assert want[0] == backend.token_to_id("<s>")
    assert backend.token_to_id("<extra_1>") in want
    assert set(EXTRA) <= set(tokenizer.all_special_tokens)
    assert "<extra_1>" not in tokenizer.decode(want, skip_special_tokens=True)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")


def test_llava_loads_with_its_rope_base_and_weights(llava_dir):
    d, batch, want = llava_dir
    model = load_model(d)
    _assert_rope_base(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want)  # the CLIP tower too, whichever layout


def test_llava_processor_gives_the_tokens(llava_dir):
    from PIL import Image

    d, _, _ = llava_dir
    processor = load_processor(d)
    tokenizer = tokenizer_of(processor)
    _assert_tokens(tokenizer)
    enc = processor(text=SAMPLE, images=Image.new("RGB", (64, 64), "red"), return_tensors="pt")
    assert int((enc["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)


def test_llama_loads_with_its_rope_base_and_tokens(llama_dir):
    from casp.info import describe

    _assert_rope_base(load_model(llama_dir))
    _assert_tokens(load_processor(llama_dir))
    assert describe(str(llama_dir))["rope_theta"] == [BASE]


def test_compressed_v5_llava_keeps_its_rope_base(llava_dir, tmp_path):
    """compress -> save -> casp.load and from_pretrained: the RoPE base survives into OUT's config."""
    from transformers import LlavaForConditionalGeneration

    d, batch, _ = llava_dir
    text = tmp_path / "calib.txt"
    text.write_text("what color is the circle ? red . " * 40)
    res = compress(d, tmp_path / "out", CompressionConfig(bits=3.0, qk_rank=0, calib_samples=4, calib_seq_len=16,
                                                           calib_text=str(text)), progress=False)
    loaded = casp.load(tmp_path / "out")
    _assert_rope_base(loaded)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    _assert_rope_base(plain)
    with torch.no_grad():
        want = res.model(**batch).logits
        assert torch.equal(loaded(**batch).logits, want)
        for fmt in ("v5", "v4"):  # OUT's CLIP tower in either layout loads the same
            other = tmp_path / f"out_{fmt}"
            shutil.copytree(tmp_path / "out", other)
            _tower_layout(other, fmt)
            assert torch.equal(casp.load(other)(**batch).logits, want)


def test_compressed_llava_answers_through_the_cli(llava_dir, tmp_path, capsys):
    """The issue's end to end: a directory in either format compresses, loads and answers, no manual edit."""
    import json

    from PIL import Image

    from casp.cli import main

    d, _, _ = llava_dir
    text = tmp_path / "calib.txt"
    text.write_text("what color is the circle ? red . " * 40)
    image = tmp_path / "pic.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    assert main(["compress", str(d), "-o", str(tmp_path / "out"), "--bits", "3", "--calib-samples", "4",
                 "--calib-seq-len", "16", "--calib-text", str(text), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "out"), "--prompt", "what color is the circle ?", "--image", str(image),
                 "--max-new-tokens", "3", "--repeats", "1", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["text"], str) and answer["tokens_per_s"] > 0 and answer["dense_tokens_per_s"] > 0


def test_streamed_compression_reads_either_format(llava_dir, tmp_path):
    """--stream reads the checkpoint's tensors itself: same names, RoPE base and weights as a whole-model run."""
    d, batch, want = llava_dir
    text = tmp_path / "calib.txt"
    text.write_text("what color is the circle ? red . " * 40)
    cfg = dict(quantizer="none", qk_rank=0, calib_samples=4, calib_seq_len=16, calib_text=str(text))
    compress(d, tmp_path / "whole", CompressionConfig(**cfg), progress=False)
    compress(d, tmp_path / "streamed", CompressionConfig(stream=True, **cfg), progress=False)
    streamed = casp.load(tmp_path / "streamed")
    _assert_rope_base(streamed)
    with torch.no_grad():
        got = streamed(**batch).logits
        assert torch.equal(got, casp.load(tmp_path / "whole")(**batch).logits)
    assert (got - want).norm() / want.norm() < 1e-2  # only fp16 storage apart from the source


def test_rope_parameters_map_onto_the_4x_fields():
    """5.x `rope_parameters` -> rope_theta / rope_scaling / rope_local_base_freq (what 4.x models read)."""
    flat = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": BASE}, rope_theta=10000.0,
                           rope_scaling=None)
    apply_rope_parameters(flat)
    assert (flat.rope_theta, flat.rope_scaling) == (BASE, None)

    mrope = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3]},
                            rope_theta=10000.0, rope_scaling=None)
    apply_rope_parameters(mrope)
    assert mrope.rope_theta == 5e5
    assert mrope.rope_scaling == {"rope_type": "default", "mrope_section": [2, 3, 3]}

    gemma = SimpleNamespace(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    }, rope_theta=1.0, rope_local_base_freq=1.0, rope_scaling=None)
    apply_rope_parameters(gemma)
    assert (gemma.rope_theta, gemma.rope_local_base_freq) == (1e6, 10000.0)
    assert gemma.rope_scaling == {"rope_type": "linear", "factor": 8.0}

    partial = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": BASE, "partial_rotary_factor": 0.5},
                              rope_theta=10000.0, rope_scaling=None, partial_rotary_factor=1.0)
    apply_rope_parameters(partial)
    assert (partial.rope_theta, partial.partial_rotary_factor, partial.rope_scaling) == (BASE, 0.5, None)


def test_unknown_tokenizer_class_falls_back_to_tokenizer_json(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    _rewrite_json(d / "tokenizer_config.json", lambda c: c.update(tokenizer_class="NoSuchTokenizerFromTheFuture"))
    assert tokenizer_config_fixes(d)["tokenizer_class"] == "PreTrainedTokenizerFast"
    _assert_tokens(load_processor(d))
