"""casp's recomputed attention maps equal the model's own eager attention weights.

For every layer, the attention input and position embeddings are caught with the engine's
`record_attention_inputs` (what the pipeline uses), q/k/scale/window come from
`Adapter.attention_qk`, and the maps from `casp.algorithms.attention.attention_probs`; they
must match `output_attentions=True` of an eager forward to 1e-5 on every real query row.
Every family of `tiny_models.BUILDERS` is checked, with an image batch for the VLMs, and
sliding-window layers (Mistral, Qwen2/3, Phi-3, Gemma 3) against the model's own windows.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import pytest
import torch
import transformers as tf

from casp.algorithms.attention import attention_probs
from casp.errors import CaspError
from casp.models.adapters import adapter_for
from casp.models.engine import record_attention_inputs
from tiny_models import (
    BUILDERS, IMAGE_ID, TEXT, tiny_batches, tiny_image_batch, tiny_model, tiny_padded_batch, tiny_qwen_vl_image_batch,
)

TOL = 1e-5


def _prepare(model, seed: int = 1):
    """Eager attention, and random norm weights and sharper q/k so that maps are far from uniform."""
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
    return model


def _batches(model, family):
    batches = tiny_batches(model) + [tiny_padded_batch()]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        batches.append(tiny_qwen_vl_image_batch())
    return batches


def _compare(model, adapter, batch, pos_map=None, rows=None, **probs_kwargs) -> tuple[list[float], list]:
    """Per layer, max |casp map − eager map| over real query rows; and each layer's AttentionQK.

    `pos_map` alters the caught position embeddings, `probs_kwargs` the maths (to show a test can
    fail); `rows` [batch, seq] (bool) restricts the comparison to those query rows.
    """
    layers = adapter.decoder_layers(model)
    sinks = [[] for _ in layers]
    with ExitStack() as stack, torch.no_grad():
        for layer, sink in zip(layers, sinks):
            stack.enter_context(record_attention_inputs(layer, adapter, sink))
        out = model(**batch, output_attentions=True, use_cache=False)
    assert len(out.attentions) == len(layers)
    mask = batch.get("attention_mask")
    errors, qks = [], []
    for i, (layer, sink) in enumerate(zip(layers, sinks)):
        (x, pos), = sink
        if pos_map is not None:
            pos = pos_map(pos)
        with torch.no_grad():
            qk = adapter.attention_qk(layer.get_submodule(adapter.attention), x, pos)
        kwargs = dict(mask=mask, scale=qk.scale, window=qk.window) | probs_kwargs
        ours = attention_probs(qk.q, qk.k, **kwargs)
        ref = out.attentions[i].float()
        assert ours.shape == ref.shape
        keep = torch.ones(ref.shape[0], 1, ref.shape[2], 1, dtype=torch.bool)
        if mask is not None:  # padded query rows see no key: HF fills them arbitrarily
            keep = mask.bool()[:, None, :, None]
        if rows is not None:
            keep = keep & rows[:, None, :, None]
        errors.append(float(torch.where(keep, (ours - ref).abs(), 0.0).max()))
        qks.append(qk)
    return errors, qks


def _expected_scale_and_windows(model, adapter) -> tuple[float, list[int | None]]:
    """The score scale and per-layer windows the config describes (Gemma 3: query_pre_attn_scalar, layer_types)."""
    tc = adapter.text_config(model)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    scale = (getattr(tc, "query_pre_attn_scalar", None) or head_dim) ** -0.5
    window = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None) or ["sliding_attention"] * tc.num_hidden_layers
    return scale, [window if t == "sliding_attention" else None for t in types]


def attention_errors(family: str) -> float:
    """Max |casp map − eager map| of a family's tiny model over all its test batches and layers."""
    model = _prepare(tiny_model(family))
    adapter = adapter_for(model)
    return max(max(_compare(model, adapter, batch)[0]) for batch in _batches(model, family))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_attention_probs_match_eager_attention(family):
    model = _prepare(tiny_model(family))
    adapter = adapter_for(model)
    scale, windows = _expected_scale_and_windows(model, adapter)
    for batch in _batches(model, family):
        errors, qks = _compare(model, adapter, batch)
        assert max(errors) <= TOL, (family, errors)
        # Mistral's default window, 4096, is longer than the sequences; Gemma 3's layers alternate 4 / full
        assert [qk.window for qk in qks] == windows
        for qk in qks:
            assert qk.scale == pytest.approx(scale)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_sections_matter_for_the_image_batch(family):
    """With text-style positions (the token index on all three M-RoPE axes) the image batch fails."""
    model = _prepare(tiny_model(family))
    adapter = adapter_for(model)

    batch = tiny_qwen_vl_image_batch()
    rotary = model.get_submodule(adapter.rotary)
    seq = batch["input_ids"].shape[1]

    def text_style(pos):  # every axis at the token's index: what plain RoPE would give
        return rotary(pos[0], torch.arange(seq).expand(3, 1, seq))

    errors, _ = _compare(model, adapter, batch, pos_map=text_style)
    assert min(errors) > 1e-3


def test_gemma3_image_tokens_attend_bidirectionally_outside_the_causal_maps():
    """With `token_type_ids` (the Gemma 3 processor sends them) image tokens see their whole image block.

    casp's maps are causal: they still equal the model's on every text query row; on image rows
    the model's own attention differs. casp's attention statistics treat image rows as causal.
    """
    model = _prepare(tiny_model("gemma3"))
    adapter = adapter_for(model)
    batch = tiny_image_batch(model, token_type_ids=True)
    image = batch["input_ids"] == IMAGE_ID
    text_rows, _ = _compare(model, adapter, batch, rows=~image)
    assert max(text_rows) <= TOL, text_rows
    image_rows, _ = _compare(model, adapter, batch, rows=image)
    assert max(image_rows) > 1e-3


# -------------------------------------------------------------------------- sliding window


def _windowed(family):
    torch.manual_seed(0)
    if family == "mistral":  # Mistral windows every layer through config.sliding_window
        return tf.MistralForCausalLM(tf.MistralConfig(**TEXT, sliding_window=4)), [4, 4]
    if family == "phi3":  # so does Phi-3
        return tf.Phi3ForCausalLM(tf.Phi3Config(**TEXT, pad_token_id=0, sliding_window=4)), [4, 4]
    if family == "gemma3_text":  # Gemma 3 alternates sliding and full layers (config.layer_types)
        return tiny_model("gemma3_text"), [4, None]
    # Qwen2 and Qwen3 window layers from max_window_layers on
    config_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
    cfg = config_cls(**TEXT, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return model_cls(cfg), [None, 4]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_sliding_window_matches_eager_attention(family):
    model, windows = _windowed(family)
    model = _prepare(model.eval())
    adapter = adapter_for(model)
    for batch in [tiny_batches(model, n=1)[0], tiny_padded_batch()]:
        errors, qks = _compare(model, adapter, batch)
        assert [qk.window for qk in qks] == windows
        assert max(errors) <= TOL, (family, errors)
        # the window changes the maps, so ignoring it would fail
        full, _ = _compare(model, adapter, batch, window=None)
        assert max(e for e, w in zip(full, windows) if w is not None) > 1e-2


# -------------------------------------------------------- q/k norms and another score scale


def _qk_norm_model(family):
    """Families whose attention has q/k norms (and, Gemma 3, another scale and windows), with their own adapters."""
    model = _prepare(tiny_model({"gemma3": "gemma3_text"}.get(family, family)))
    return model, adapter_for(model)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "internvl"])
def test_hook_applies_qk_norms_scale_and_window(family):
    model, adapter = _qk_norm_model(family)
    batch = tiny_batches(model, n=1)[0]
    errors, qks = _compare(model, adapter, batch)
    assert max(errors) <= TOL, (family, errors)
    if family == "gemma3":
        assert [qk.scale for qk in qks] == [64 ** -0.5] * 2
        assert [qk.window for qk in qks] == [4, None]
        wrong, _ = _compare(model, adapter, batch, scale=None)  # the implicit 1/√d
        assert min(wrong) > 1e-3
    # without the q/k norms the maps are wrong
    no_norm = dataclasses.replace(adapter, q_norm="self_attn.none", k_norm="self_attn.none")
    wrong, _ = _compare(model, no_norm, batch)
    assert min(wrong) > 1e-3


def _sliding_window_rope(model, x, position_ids):
    """Gemma 3's (cos, sin) for sliding layers: a module of its own in transformers 4, a layer type in 5."""
    if hasattr(model.model, "rotary_emb_local"):
        return model.model.rotary_emb_local(x, position_ids)
    return model.model.rotary_emb(x, position_ids, "sliding_attention")


def test_low_rank_replacements_keep_the_layers_norms_rope_and_scale():
    model, adapter = _qk_norm_model("gemma3")
    layer = adapter.decoder_layers(model)[0]
    attention = layer.get_submodule(adapter.attention)
    x = torch.randn(1, 6, TEXT["hidden_size"])
    pos = _sliding_window_rope(model, x, torch.arange(6)[None])
    with torch.no_grad():
        own = adapter.attention_qk(attention, x, pos)
        same = adapter.attention_qk(attention, x, pos, q_proj=attention.q_proj, k_proj=attention.k_proj)
        half_q = torch.nn.Linear(TEXT["hidden_size"], attention.q_proj.out_features, bias=False)
        half_q.weight.copy_(attention.q_proj.weight / 2)
        other = adapter.attention_qk(attention, x, pos, q_proj=half_q)
    torch.testing.assert_close(same.q, own.q)
    torch.testing.assert_close(same.k, own.k)
    torch.testing.assert_close(other.k, own.k)
    # the q norm (RMS) removes the factor 2: only a hook that applies it gives the same queries
    torch.testing.assert_close(other.q, own.q, rtol=1e-4, atol=1e-4)
    assert (other.scale, other.window) == (own.scale, own.window)


def test_softcapped_attention_is_refused():
    model, adapter = _qk_norm_model("gemma3")
    attention = adapter.decoder_layers(model)[0].get_submodule(adapter.attention)
    attention.attn_logit_softcapping = 50.0
    with pytest.raises(CaspError, match="soft-capping"):
        adapter.attention_qk(attention, torch.randn(1, 3, TEXT["hidden_size"]), None)


def test_fused_qkv_is_split_into_q_and_k():
    """Phi-3's hook slices q and k out of the fused W_qkv output; slicing k from the v rows fails."""
    model = _prepare(tiny_model("phi3"))
    adapter = adapter_for(model)
    assert not adapter.separate_qk
    batch = tiny_batches(model, n=1)[0]
    errors, qks = _compare(model, adapter, batch)
    assert max(errors) <= TOL, errors
    assert qks[0].q.shape[2:] == (TEXT["num_attention_heads"], 16) and qks[0].k.shape[2:] == (TEXT["num_key_value_heads"], 16)
    attention = adapter.decoder_layers(model)[0].get_submodule(adapter.attention)
    x = torch.randn(1, 5, TEXT["hidden_size"])
    with torch.no_grad():
        own = adapter.attention_qk(attention, x, None)
        qkv = attention.qkv_proj(x)
    torch.testing.assert_close(own.k.reshape(1, 5, -1), qkv[..., 64:96])
    assert not torch.allclose(own.k.reshape(1, 5, -1), qkv[..., 96:])
    with pytest.raises(CaspError, match="fused"):
        adapter.attention_qk(attention, x, None, q_proj=attention.qkv_proj)
