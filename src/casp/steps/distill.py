"""Step (optional, `--e2e-steps N`): distil the compressed model into the original's next-token distribution.

Before the layer pass, the original model runs once on the samples distillation uses, and its final
normalised hidden states are kept (tokens × hidden, fp16). The teacher's logits are the model's own output
head on them, so no second copy of the model is held. After every layer is compressed (and the baseline
check has decided), the continuous stored parameters of the compressed decoder layers
(`casp.steps.finetune.Trainable`: scales, codebooks, E8 scales, norms, biases; codes fixed) are trained with
Adam on KL(original ‖ compressed) over the attended text positions (image tokens left out) of one
calibration sample per step (the first `--e2e-steps` samples in turn). Each decoder layer is recomputed in
the backward pass (activation checkpointing), so memory grows with one layer's activations, not with
depth. The last eighth of the samples (at least one) is held out: the trained values are kept only if the
KL on them falls. Deterministic: no randomness, samples in a fixed order.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from casp.data.scored import model_inputs
from casp.steps.finetune import Trainable, relative_adam, split_held


class _Stop(Exception):
    pass


@dataclass
class Teacher:
    """The samples distillation trains and decides on, and the original model's final hidden states on each."""

    train: list[dict]
    held: list[dict]
    states: list[torch.Tensor]    # per sample of train + held, fp16 (batch, tokens, hidden)
    seconds: float = 0.0          # the original model's pass


def prepare(run, batches: list[dict]) -> Teacher:
    """Run the original model on the samples the steps will use; keep its final normalised hidden states."""
    from casp.data.calibration import samples_of

    t0 = time.time()
    samples = samples_of(batches)
    steps, n = run.recipe.e2e_steps, len(samples)
    held_n = split_held(n)
    train = samples[:n - held_n][:steps]
    held = samples[n - held_n:] or train
    norm = run.model.get_submodule(run.adapter.final_norm)
    caught: list[torch.Tensor] = []

    def hook(_module, _args, out):
        caught.append(out.detach().to(torch.float16))
        raise _Stop

    handle = norm.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in train + held:
                try:
                    run.model(**model_inputs(batch), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return Teacher(train, held, caught, time.time() - t0)


def _head(model: nn.Module):
    """logits from final hidden states, as the model computes them (its output head, then any soft cap)."""
    head = model.get_output_embeddings()
    config = getattr(model.config, "text_config", model.config)
    cap = getattr(config, "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = head(h.to(head.weight.dtype))
        return torch.tanh(z / cap) * cap if cap else z

    return logits


def _image_token(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "image_token_id", getattr(config, "image_token_index", None))


def text_positions(model: nn.Module, batch: dict) -> torch.Tensor:
    """1 where a position is attended and is not an image token (logits at image tokens are never used)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).float()
    image = _image_token(model)
    return mask * (ids != image).float() if image is not None else mask


def sample_kl(model: nn.Module, batch: dict, state: torch.Tensor, head) -> torch.Tensor:
    """Mean over attended text positions of KL(original ‖ model), the original's logits from its kept state."""
    logits = model(**model_inputs(batch), use_cache=False).logits.float()
    with torch.no_grad():
        target = F.log_softmax(head(state.float()).float(), dim=-1)
    per_token = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="none").sum(-1)
    mask = text_positions(model, batch)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def held_kl(model: nn.Module, teacher: Teacher) -> float:
    """Mean KL over the held-out samples."""
    head = _head(model)
    states = teacher.states[len(teacher.train):]
    return sum(float(sample_kl(model, b, s, head)) for b, s in zip(teacher.held, states)) / len(teacher.held)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def recomputed(layers):
    """Each layer's activations are recomputed in the backward pass instead of kept."""
    for layer in layers:
        layer.forward = _checkpointed(type(layer).forward.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def distill(run, teacher: Teacher) -> dict:
    """`--e2e-steps` Adam steps on the compressed layers' continuous parameters (see the module doc); the report entry."""
    from tqdm.auto import tqdm

    t0 = time.time()
    model, recipe = run.model, run.recipe
    all_layers = run.adapter.decoder_layers(model)
    layers = nn.ModuleList([all_layers[i] for i in (recipe.layers or range(len(all_layers)))])
    before = held_kl(model, teacher)
    head = _head(model)
    trainable = Trainable(layers)
    with trainable, recomputed(layers), torch.enable_grad():
        opt = relative_adam(trainable.parameters, recipe.e2e_lr)
        for step in tqdm(range(recipe.e2e_steps), desc="e2e", disable=not run.progress):
            i = step % len(teacher.train)
            opt.zero_grad(set_to_none=True)
            sample_kl(model, teacher.train[i], teacher.states[i], head).backward()
            opt.step()
        trainable.keep()
    after = held_kl(model, teacher)
    if not after < before:   # NaN included
        trainable.revert()
    kept = after < before
    return {"steps": recipe.e2e_steps, "samples": len(teacher.train), "held_out_samples": len(teacher.held),
            "kl_before": before, "kl_after": after if kept else before, "kept": kept, "seconds": time.time() - t0 + teacher.seconds}
