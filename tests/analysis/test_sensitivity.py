"""`output_fisher`: the mean squared loss gradient of every decoder linear's outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from casp.analysis.sensitivity import output_fisher
from casp.models.adapters import adapter_for
from tiny_models import tiny_batches, tiny_model, tiny_padded_batch


def _decoder_linears(model, adapter) -> list[str]:
    return [f"{adapter.layers}.{i}.{name}"
            for i, layer in enumerate(adapter.decoder_layers(model))
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _reference(model, batches, names, image_token=None) -> dict[str, torch.Tensor]:
    """Autograd on the full model: mean over every token position of (dL/dy)², y each linear's output."""
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    for batch in batches:
        outs, handles = {}, []
        for n in names:
            def keep(_m, _a, out, n=n):
                out.retain_grad()
                outs[n] = out
            handles.append(model.get_submodule(n).register_forward_hook(keep))
        labels = batch["input_ids"].clone()
        if image_token is not None:
            labels[labels == image_token] = -100
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        model(**batch, labels=labels, use_cache=False).loss.backward()
        for h in handles:
            h.remove()
        for n in names:
            g = outs[n].grad.reshape(-1, outs[n].shape[-1])
            sums[n] = sums[n] + g.pow(2).sum(0)
            counts[n] += g.shape[0]
        model.zero_grad(set_to_none=True)
    return {n: sums[n] / counts[n] for n in names}


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_output_fisher_is_the_mean_squared_output_gradient(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = tiny_batches(model) + [tiny_padded_batch()]
    names = _decoder_linears(model, adapter)
    assert set(names) == {f"{adapter.layers}.{i}.{n}" for i in range(len(adapter.decoder_layers(model)))
                          for n in adapter.linear_names()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    fisher = output_fisher(model, adapter, batches, progress=False)

    assert sorted(fisher) == sorted(names)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    image_token = getattr(model.config, "image_token_index", None)
    ref = _reference(model, batches, names, image_token)
    for n in names:
        assert fisher[n].shape == (model.get_submodule(n).out_features,)
        assert bool((fisher[n] > 0).any())
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-4, atol=1e-12)


def test_output_fisher_stops_after_max_tokens():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    batches = tiny_batches(model, n=3)
    first = output_fisher(model, adapter, batches, progress=False, max_tokens=batches[0]["input_ids"].numel())
    names = _decoder_linears(model, adapter)
    ref = _reference(model, batches[:1], names)
    for n in names:
        torch.testing.assert_close(first[n], ref[n], rtol=1e-4, atol=1e-12)
    everything = output_fisher(model, adapter, batches, progress=False)
    assert not torch.allclose(everything[names[0]], first[names[0]])


def test_sampled_targets_give_the_fisher_information_of_the_prediction():
    """Drawn from the model's own distribution p, the targets make E[(dCE/dz)²] = p(1 - p) per logit: the
    Fisher information of the prediction (the empirical targets give (p - onehot(next token))² instead)."""
    from casp.analysis.sensitivity import _generator, _next_token_loss

    torch.manual_seed(0)
    z = torch.randn(7)
    n = 40000
    logits = z.repeat(1, n + 1, 1).requires_grad_(True)
    labels = torch.zeros(1, n + 1, dtype=torch.long)
    labels[0, 1::97] = -100                      # unscored positions stay unscored
    _next_token_loss(logits, labels, _generator("sampled", 0, "cpu")).backward()
    scored = labels[0, 1:] != -100
    g = logits.grad[0, :-1][scored] * scored.sum()
    p = torch.softmax(z, -1)
    assert torch.allclose(g.pow(2).mean(0), p * (1 - p), atol=0.01)
    assert logits.grad[0, :-1][~scored].abs().max() == 0
    again = z.repeat(1, n + 1, 1).requires_grad_(True)
    _next_token_loss(again, labels, _generator("sampled", 0, "cpu")).backward()
    assert torch.equal(again.grad, logits.grad)   # the seed fixes the draws


def test_the_fisher_labels_reach_the_plan_and_its_cache_key(tiny_llama_dir, scene_text):
    from casp.config import CompressionConfig
    from casp.errors import CaspError
    from casp.recipe import resolve

    base = dict(bits=3.25, calib_samples=4, calib_seq_len=32, calib_text=str(scene_text))
    sampled = resolve(CompressionConfig(fisher="sampled", **base), tiny_llama_dir)
    empirical = resolve(CompressionConfig(**base), tiny_llama_dir)
    assert (sampled.fisher, empirical.fisher) == ("sampled", "empirical")
    assert sampled.measurement_key() != empirical.measurement_key()
    old = {k: v for k, v in empirical.to_dict().items() if k != "fisher"}
    assert type(empirical).from_dict(old).fisher == "empirical"   # a recipe written before the choice existed
    with pytest.raises(CaspError, match="--fisher"):
        resolve(CompressionConfig(fisher="true", **base), tiny_llama_dir)


def test_the_recipe_sets_how_many_tokens_the_sensitivity_pass_reads(tiny_llama_dir, scene_text, monkeypatch):
    import casp.analysis.sensitivity as sensitivity
    from casp import compress
    from casp.config import CompressionConfig

    seen, real = [], sensitivity.output_fisher

    def spy(*args, **kwargs):
        seen.append(kwargs["max_tokens"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "output_fisher", spy)
    compress(tiny_llama_dir, config=CompressionConfig(bits=3.25, calib_samples=4, calib_seq_len=32, fisher_tokens=64,
                                                      calib_text=str(scene_text), check_samples=0), progress=False)
    assert seen == [64]
