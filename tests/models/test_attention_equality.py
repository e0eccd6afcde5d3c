"""casp's recomputed attention maps equal the model's own eager attention weights.

For every layer, the attention input and position embeddings are caught with the engine's
`record_attention_inputs` (what the pipeline uses), q/k/scale/window come from
`Adapter.attention_qk`, and the maps from `casp.algorithms.attention.attention_probs`; they
must match `output_attentions=True` of an eager forward to 1e-5 on every real query row.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import pytest
import torch
import transformers as tf

from casp.algorithms.attention import attention_probs
from casp.errors import CaspError
from casp.models.adapters import adapter_for, adapter_for_architecture
from casp.models.engine import record_attention_inputs
from tiny_models import TEXT, BUILDERS, tiny_batches, tiny_model, tiny_padded_batch, tiny_qwen_vl_image_batch

TOL = 1e-5


def _prepare(model, seed: int = 1):
    """Eager attention, and random norm weights and sharper q/k so that maps are far from uniform."""
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def _batches(model, family):
    batches = tiny_batches(model) + [tiny_padded_batch()]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        batches.append(tiny_qwen_vl_image_batch())
    return batches


def _compare(model, adapter, batch, pos_map=None, **probs_kwargs) -> tuple[list[float], list]:
    """Per layer, max |casp map − eager map| over real query rows; and each layer's AttentionQK.

    `pos_map` alters the caught position embeddings, `probs_kwargs` the maths (to show a test can fail).
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
        rows = torch.ones(ref.shape[0], 1, ref.shape[2], 1, dtype=torch.bool)
        if mask is not None:  # padded query rows see no key: HF fills them arbitrarily
            rows = mask.bool()[:, None, :, None]
        errors.append(float(torch.where(rows, (ours - ref).abs(), 0.0).max()))
        qks.append(qk)
    return errors, qks


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_attention_probs_match_eager_attention(family):
    model = _prepare(tiny_model(family))
    adapter = adapter_for(model)
    for batch in _batches(model, family):
        errors, qks = _compare(model, adapter, batch)
        assert max(errors) <= TOL, (family, errors)
        for qk in qks:  # Mistral's default window, 4096, is longer than the sequences
            assert qk.window == getattr(adapter.text_config(model), "sliding_window", None)
            assert qk.scale == pytest.approx((TEXT["hidden_size"] // TEXT["num_attention_heads"]) ** -0.5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_sections_matter_for_the_image_batch(family):
    """With the temporal positions on all three M-RoPE axes (text-style RoPE) the image batch fails."""
    model = _prepare(tiny_model(family))
    adapter = adapter_for(model)

    def temporal_only(pos):
        return tuple(p[:1].expand_as(p) for p in pos)

    errors, _ = _compare(model, adapter, tiny_qwen_vl_image_batch(), pos_map=temporal_only)
    assert min(errors) > 1e-3


# -------------------------------------------------------------------------- sliding window


def _windowed(family):
    torch.manual_seed(0)
    if family == "mistral":  # Mistral windows every layer through config.sliding_window
        return tf.MistralForCausalLM(tf.MistralConfig(**TEXT, sliding_window=4)), [4, 4]
    # Qwen2 windows layers from max_window_layers on
    cfg = tf.Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return tf.Qwen2ForCausalLM(cfg), [None, 4]


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
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
    """Families casp does not list, whose attention has q/k norms (and, Gemma 3, another scale and windows)."""
    torch.manual_seed(0)
    if family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TEXT, head_dim=16))
    else:
        cfg = tf.Gemma3TextConfig(**TEXT, head_dim=16, query_pre_attn_scalar=64, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"])
        model = tf.Gemma3ForCausalLM(cfg)
    arch = type(model).__name__
    adapter = dataclasses.replace(adapter_for_architecture("LlamaForCausalLM"), family=family, architectures=(arch,))
    return _prepare(model.eval()), adapter


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
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


def test_low_rank_replacements_keep_the_layers_norms_rope_and_scale():
    model, adapter = _qk_norm_model("gemma3")
    layer = adapter.decoder_layers(model)[0]
    attention = layer.get_submodule(adapter.attention)
    x = torch.randn(1, 6, TEXT["hidden_size"])
    pos = model.model.rotary_emb_local(x, torch.arange(6)[None])
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
