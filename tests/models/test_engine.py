"""The layer-by-layer engine reproduces each family's own final hidden states."""
import pytest
import torch
import transformers as tf

from casp.models.adapters import SUPPORTED_ARCHITECTURES, adapter_for, adapter_for_architecture
from casp.models.engine import (
    SecondMoments, capture_layer0_inputs, final_hidden_states, record_second_moments, run_layer,
)
from casp.errors import CaspError
from tiny_models import BUILDERS, TEXT, tiny_batches, tiny_image_batch, tiny_model


def _reference_final_hidden(model, adapter, batch):
    captured = []
    norm = model.get_submodule(adapter.final_norm)
    h = norm.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**batch, use_cache=False)
    h.remove()
    return captured[0]


def _engine_errors(model, adapter, batches, typed: bool = True) -> list[float]:
    """Per batch, max |engine final hidden − model's own|; `typed=False` gives every layer layer 0's kwargs."""
    inputs = capture_layer0_inputs(model, adapter, batches)
    assert len(inputs) == len(batches)
    if not typed:
        inputs.typed = {}
    for layer in adapter.decoder_layers(model):
        inputs.hidden = run_layer(layer, inputs)
    ours = final_hidden_states(model, adapter, inputs.hidden)
    return [float((h - _reference_final_hidden(model, adapter, batch)).abs().max()) for batch, h in zip(batches, ours)]


def engine_error(family: str) -> float:
    """Max |engine − model| final hidden state of a family's tiny model over its test batches."""
    model = tiny_model(family)
    return max(_engine_errors(model, adapter_for(model), tiny_batches(model)))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_layer_by_layer_reproduces_final_hidden_states(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    batches = tiny_batches(model)
    inputs = capture_layer0_inputs(model, adapter, batches)
    assert len(inputs) == len(batches)
    for layer in adapter.decoder_layers(model):
        inputs.hidden = run_layer(layer, inputs)
    ours = final_hidden_states(model, adapter, inputs.hidden)
    for batch, h in zip(batches, ours):
        ref = _reference_final_hidden(model, adapter, batch)
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


def _mixed_attention_types(case):
    """A model whose layers differ in attention type, its batches, and the types caught beside layer 0's."""
    if case == "qwen2":  # layer 0 full, layer 1 sliding
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        model = tf.Qwen2ForCausalLM(cfg).eval()
        return model, tiny_batches(model), {"sliding_attention"}
    model = tiny_model(case)  # Gemma 3: layer 0 sliding, layer 1 full
    batches = tiny_batches(model)
    if case == "gemma3":  # image tokens attend bidirectionally within the image, in both masks
        batches.append(tiny_image_batch(model, token_type_ids=True))
    return model, batches, {"full_attention"}


@pytest.mark.parametrize("case", ["gemma3_text", "gemma3", "qwen2"])
def test_each_attention_type_gets_the_models_own_mask(case):
    """Sliding and full layers get different masks: layer 0's mask alone would be wrong for the others."""
    model, batches, others = _mixed_attention_types(case)
    adapter = adapter_for(model)
    assert set(capture_layer0_inputs(model, adapter, batches).typed) == others
    assert max(_engine_errors(model, adapter, batches)) <= 1e-5
    assert max(_engine_errors(model, adapter, batches, typed=False)) > 1e-2


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_second_moments_match_direct_computation(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = capture_layer0_inputs(model, adapter, tiny_batches(model))
    layer = adapter.decoder_layers(model)[0]
    moments = SecondMoments()
    with record_second_moments(layer, adapter.linears, moments):
        run_layer(layer, inputs)
    x = torch.cat([layer.input_layernorm(h).reshape(-1, h.shape[-1]) for h in inputs.hidden]).double()
    torch.testing.assert_close(moments.xtx["attn_in"], x.T @ x, rtol=1e-5, atol=1e-4)
    assert moments.tokens["attn_in"] == inputs.num_tokens
    assert set(moments.xtx) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}


def test_second_moments_flush_float32_partial_sums_into_float64(monkeypatch):
    from casp.models import engine

    monkeypatch.setattr(engine, "FLUSH_TOKENS", 10)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 7, 5, generator=g) for _ in range(5)]
    moments = SecondMoments()
    for x in xs:
        moments.add("g", x)
    assert moments.sums["g"].dtype == torch.float64 and moments._pending_tokens["g"] == 7
    x = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    torch.testing.assert_close(moments.xtx["g"], x.T @ x, rtol=1e-5, atol=1e-5)
    assert moments.tokens["g"] == 35 and not moments._pending
    moments.add("g", xs[0])
    torch.testing.assert_close(moments.xtx["g"], x.T @ x + (xs[0].reshape(-1, 5).double().T @ xs[0].reshape(-1, 5).double()),
                               rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(CaspError) as e:
        adapter_for_architecture("GPT2LMHeadModel")
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)
