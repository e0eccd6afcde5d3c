"""Kept layer states: a model run from decoder layer i on the original's kept inputs gives the model's own logits
whenever every change is at layer i or above."""
import pytest
import torch

from casp.models.adapters import adapter_for
from casp.models.suffix import layer_states, logits_from
from tiny_models import BUILDERS, tiny_batches, tiny_image_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(model):
    image = tiny_image_batch(model)
    return tiny_batches(model) + ([image] if image is not None else [])


def _own_logits(model, batches):
    with torch.no_grad():
        return [model(**b, use_cache=False).logits.float() for b in batches]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_run_from_the_changed_layer_gives_the_models_own_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = _batches(model)
    states = layer_states(model, adapter, batches)
    layers = adapter.decoder_layers(model)
    assert len(states.hidden) == len(layers) + 1
    for ours, own in zip(logits_from(model, adapter, states, len(layers)), _own_logits(model, batches)):
        torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-4)
    last = layers[-1]
    linear = last.get_submodule(adapter.linear_names()[0])
    with torch.no_grad():
        linear.weight.add_(torch.randn_like(linear.weight) * linear.weight.std())
    changed = _own_logits(model, batches)
    for ours, own, before in zip(logits_from(model, adapter, states, len(layers) - 1), changed,
                                 logits_from(model, adapter, states, len(layers))):
        assert (own - before).abs().max() > 1e-3   # the change shows, and the kept path follows it
        torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-4)
