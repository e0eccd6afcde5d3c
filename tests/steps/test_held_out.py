"""Held-out probes run from the changed layer: the same KL as the whole model, or the whole model where the kept
path does not reproduce the original."""
from types import SimpleNamespace

import pytest
import torch

import casp.models.suffix as suffix
from casp.models.adapters import adapter_for
from casp.steps.held_out import held_out
from casp.steps.search import kl_rows
from tiny_models import tiny_batches, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(family):
    model = tiny_model(family)
    return SimpleNamespace(model=model, adapter=adapter_for(model), device="cpu", reference=None)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_probe_from_its_layer_measures_the_whole_models_kl(family):
    run = _run(family)
    held = tiny_batches(run.model, n=3, seq=16)
    probes = held_out(run, held)
    assert probes.states is not None
    assert len(probes.rows) == sum(b["input_ids"].shape[0] for b in held)   # one text row per batch
    layers = run.adapter.decoder_layers(run.model)
    linear = layers[-1].get_submodule(run.adapter.linear_names()[-1])
    with torch.no_grad():
        linear.weight.mul_(0.5)
    whole = kl_rows(run.model, probes.rows, probes.reference)
    kept = probes.kl_rows(run, len(layers) - 1)
    assert sum(t for t, _ in whole) > 1e-4
    assert [c for _, c in kept] == [c for _, c in whole]
    assert [t for t, _ in kept] == pytest.approx([t for t, _ in whole], rel=1e-3, abs=1e-6)


def test_a_head_the_kept_path_does_not_reproduce_runs_the_whole_model(monkeypatch):
    run = _run("llama")
    real = suffix.head_logits
    monkeypatch.setattr(suffix, "head_logits", lambda model, adapter, h: 2 * real(model, adapter, h))
    probes = held_out(run, tiny_batches(run.model, n=2, seq=16))
    assert probes.states is None
    rows = probes.kl_rows(run, 1)
    assert sum(t for t, _ in rows) / sum(c for _, c in rows) < 1e-4   # the original model, run whole
