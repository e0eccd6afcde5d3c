"""What casp cannot compress is refused in one line naming the supported families and the reason."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from casp.config import CompressionConfig
from casp.errors import CaspError
from casp.info import families, format_families
from casp.models.adapters import ADAPTERS, SUPPORTED_ARCHITECTURES, adapter_for, adapter_for_architecture
from casp.pipeline import compress
from tiny_models import TEXT, tiny_model, word_tokenizer

MOE = dict(TEXT, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _assert_names_supported(message: str) -> None:
    assert "\n" not in message
    for ad in ADAPTERS:
        assert ad.family in message
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in message


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_moe_architectures_are_refused_with_the_reason(arch):
    with pytest.raises(CaspError) as e:
        adapter_for_architecture(arch)
    assert "mixture-of-experts" in str(e.value)
    _assert_names_supported(str(e.value))


def test_moe_model_in_memory_is_refused():
    torch.manual_seed(0)
    with pytest.raises(CaspError, match="mixture-of-experts"):
        adapter_for(tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**MOE)))


def test_vlm_around_an_moe_language_model_is_refused():
    """A supported VLM class whose language model is MoE: its decoder layers lack the dense MLP linears."""
    torch.manual_seed(0)
    cfg = tf.InternVLConfig(text_config=dict(MOE, model_type="qwen3_moe"),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
                            image_token_id=127)
    with pytest.raises(CaspError) as e:
        adapter_for(tf.InternVLForConditionalGeneration(cfg))
    assert "mixture-of-experts" in str(e.value) and "decoder layer 0" in str(e.value)
    _assert_names_supported(str(e.value))


def test_unknown_family_is_refused_with_the_supported_list():
    with pytest.raises(CaspError) as e:
        adapter_for_architecture("GPT2LMHeadModel")
    assert "no adapter" in str(e.value)
    _assert_names_supported(str(e.value))


@pytest.mark.parametrize("qk_rank", [0.25, "auto"])
def test_fused_qkv_refuses_low_rank_qk(qk_rank, scene_text, one_torch_thread, monkeypatch):
    """Phi-3's W_q and W_k are rows of one W_qkv: a forced low rank is refused, before any calibration."""
    import casp.steps.load as load_step

    monkeypatch.setattr(load_step, "build_calibration", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    cfg = CompressionConfig(bits=3.0, qk_rank=qk_rank, calib_samples=4, calib_seq_len=16, calib_text=str(scene_text))
    with pytest.raises(CaspError) as e:
        compress(tiny_model("phi3"), None, cfg, processor=word_tokenizer(), progress=False)
    message = str(e.value)
    assert "fused" in message and "--qk-rank 0" in message and "\n" not in message


def test_fused_qkv_with_joint_ranks_keeps_the_fused_projection_dense(scene_text, one_torch_thread):
    """The default joint allocation offers a fused family only its dense W_qkv, at every bit setting."""
    cfg = CompressionConfig(bits=3.0, qk_rank="joint", calib_samples=4, calib_seq_len=16, calib_text=str(scene_text))
    res = compress(tiny_model("phi3"), None, cfg, processor=word_tokenizer(), progress=False)
    assert all(lr["rank_q"] == 0 and lr["rank_k"] == 0 for lr in res.report["decoder_layers"])
    assert res.report["average_bits"] <= 3.0


def test_fused_qkv_refuses_a_low_rank_layer_override(scene_text, one_torch_thread):
    cfg = CompressionConfig(bits=3.0, qk_rank=0, qk_rank_overrides={1: 0.5}, calib_samples=4, calib_seq_len=16,
                            calib_text=str(scene_text))
    with pytest.raises(CaspError, match="fused"):
        compress(tiny_model("phi3"), None, cfg, processor=word_tokenizer(), progress=False)


def test_families_table_lists_every_family():
    rows = families()
    assert [r["family"] for r in rows] == [ad.family for ad in ADAPTERS]
    by_family = {r["family"]: r for r in rows}
    assert by_family["phi3"]["compressed"] == ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                               "mlp.down_proj"]
    assert not by_family["phi3"]["low_rank_qk"]
    assert "vision tower" in by_family["gemma3"]["kept_16bit"]
    assert "sliding" in by_family["gemma3_text"]["notes"]
    text = format_families(rows)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in text


def test_cli_info_families(capsys):
    import json

    from casp.cli import main

    assert main(["info", "--families"]) in (0, None)
    out = capsys.readouterr().out
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in out
    assert main(["info", "--families", "--json"]) in (0, None)
    rows = json.loads(capsys.readouterr().out)["families"]
    assert {r["family"] for r in rows} == {ad.family for ad in ADAPTERS}


def test_readme_table_lists_every_family():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    for ad in ADAPTERS:
        assert f"| `{ad.family}` |" in section, ad.family
        for arch in ad.architectures:
            assert f"`{arch}`" in section, arch
