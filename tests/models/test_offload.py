"""`offloaded` / `parts_on`: the same outputs with each layer visiting the device, and the model put back."""
import pytest
import torch

from casp.models.adapters import adapter_for
from casp.models.offload import offloaded, parts_on
from device_spy import DeviceSpy
from tiny_models import tiny_batches, tiny_model


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_offloaded_gives_the_same_logits_one_layer_at_a_time(family, monkeypatch):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    batches = tiny_batches(model)
    with torch.no_grad():
        plain = [model(**b, use_cache=False).logits for b in batches]
    spy = DeviceSpy(monkeypatch, "cpu:0")
    spy.watch(layers)
    hooks = [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in layers]
    with offloaded(model, adapter, "cpu:0"), torch.no_grad():
        moved = [model(**b, use_cache=False).logits for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))
    assert spy.problems == [] and spy.on == set()
    assert spy.visits == list(range(len(layers))) * len(batches)
    assert hooks == [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in layers]


def test_offloaded_on_plain_cpu_adds_nothing():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with offloaded(model, adapter, "cpu"):
        assert all(not layer._forward_pre_hooks for layer in adapter.decoder_layers(model))


def test_parts_on_moves_only_what_is_outside_the_layers_and_puts_the_originals_back(monkeypatch):
    model = tiny_model("llava")
    adapter = adapter_for(model)
    prefix = adapter.layers + "."
    tensors = _tensors(model)
    before = {k: t.data_ptr() for k, t in tensors.items()}
    moved, real_to = set(), torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cpu:0":
            moved.add(self.data_ptr())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    with parts_on(model, adapter, "cpu:0"):
        pass
    monkeypatch.undo()
    outside = {before[k] for k in tensors if not k.startswith(prefix)}
    assert moved == outside and any("vision" in k for k in tensors if not k.startswith(prefix))
    assert not moved & {before[k] for k in tensors if k.startswith(prefix)}
    assert {k: t.data_ptr() for k, t in _tensors(model).items()} == before
