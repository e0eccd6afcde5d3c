import pytest
import torch

from casp.models.adapters import SUPPORTED_ARCHITECTURES, adapter_for, adapter_for_architecture
from casp.models.engine import (
    SecondMoments, capture_layer0_inputs, final_hidden_states, record_second_moments, run_layer,
)
from casp.errors import CaspError
from tiny_models import BUILDERS, tiny_batches, tiny_model


def _reference_final_hidden(model, adapter, batch):
    captured = []
    norm = model.get_submodule(adapter.final_norm)
    h = norm.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**batch, use_cache=False)
    h.remove()
    return captured[0]


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


def test_unsupported_architecture_lists_supported():
    with pytest.raises(CaspError) as e:
        adapter_for_architecture("GPT2LMHeadModel")
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)
