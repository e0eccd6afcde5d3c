"""How much the model's loss cares about each linear's output: a diagonal Fisher estimate.

F_o = mean over calibration tokens of (dL/dy_o)², y the linear's output and L the
next-token cross-entropy. Weighting a matrix's output error by F makes errors of
different layers comparable, which the rate-distortion bit allocation needs.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.models.adapters import Adapter


def _labels(batch: dict, image_token_id: int | None) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    if image_token_id is not None:
        labels[labels == image_token_id] = -100
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


FISHER_TOKENS = 16384


BACKWARD_TOKENS = 1024


def _small_batches(batches: list[dict]):
    """Split text batches into pieces of about BACKWARD_TOKENS tokens: a backward pass keeps every activation."""
    for b in batches:
        rows = b["input_ids"].shape[0]
        step = max(1, BACKWARD_TOKENS // b["input_ids"].shape[1])
        if rows <= step or any(k not in ("input_ids", "attention_mask") for k in b):
            yield b
            continue
        for i in range(0, rows, step):
            yield {k: v[i:i + step] for k, v in b.items()}


def output_fisher(model: nn.Module, adapter: Adapter, batches: list[dict], progress: bool = True,
                  max_tokens: int = FISHER_TOKENS) -> dict[str, torch.Tensor]:
    """Per linear (dotted name inside the model), the mean squared loss gradient of each output channel.

    A backward pass costs about three forward passes, so only the first batches up to
    `max_tokens` tokens are used: the estimate only has to rank layers, not be exact.
    """
    used, kept = 0, []
    for b in batches:
        if used >= max_tokens:
            break
        kept.append(b)
        used += b["input_ids"].numel()
    batches = kept
    layers = adapter.decoder_layers(model)
    prefix = adapter.layers
    names = [f"{prefix}.{i}.{n}" for i in range(len(layers)) for n in adapter.linear_names()]
    sums = {n: None for n in names}
    counts = {n: 0 for n in names}
    handles = []

    def make_hook(name):
        def fwd(_m, _inp, out):
            def grad_hook(g):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1])
                sums[name] = g2.sum(0) if sums[name] is None else sums[name] + g2.sum(0)
                counts[name] += g2.shape[0]

            if out.requires_grad:
                out.register_hook(grad_hook)

        return fwd

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(make_hook(n)))
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.get_submodule(adapter.input_norm).weight.requires_grad_(True)
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    try:
        for batch in tqdm(_small_batches(batches), desc="sensitivity", disable=not progress, leave=False):
            out = model(**batch, labels=_labels(batch, image_token), use_cache=False)
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    return {n: (sums[n] / max(counts[n], 1)) for n in names if sums[n] is not None}
