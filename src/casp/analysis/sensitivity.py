"""How much the model's loss cares about each linear's output: a diagonal Fisher estimate.

F_o = mean over calibration tokens of (dL/dy_o)², y the linear's output and L the
next-token cross-entropy. Weighting a matrix's output error by F makes errors of
different layers comparable, which the rate-distortion bit allocation needs.

The cross-entropy's targets are the calibration text's own next tokens ("empirical") or tokens drawn
from the model's own prediction ("sampled"): the latter's F is, in expectation, the Fisher information
of the model's output distribution, the curvature of KL(original ‖ compressed) that the baseline check
and the held-out search measure. The empirical one weights early layers 2-4× more against late ones
than the sampled one on SmolLM2-135M and Gemma-3-270M (docs/allocation.md).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.config import FISHER_LABELS, FISHER_TOKENS
from casp.data.scored import model_inputs, target_labels
from casp.models.adapters import Adapter


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against token t+1 of `labels` (-100: not scored), or, with a
    generator, against a token drawn from position t's own predicted distribution at every scored position."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(logits.device)
    if generator is not None:
        drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]
        target = torch.where(target == -100, target, drawn)
    return nn.functional.cross_entropy(logits, target, ignore_index=-100)


def _generator(labels: str, seed: int, device) -> torch.Generator | None:
    if labels not in FISHER_LABELS:
        raise ValueError(f"Fisher labels must be one of {FISHER_LABELS}, got {labels!r}")
    return torch.Generator(device=device).manual_seed(seed) if labels == "sampled" else None


def _image_token(model: nn.Module) -> int | None:
    token = getattr(model.config, "image_token_id", None)
    return token if token is not None else getattr(model.config, "image_token_index", None)


BACKWARD_TOKENS = 512   # a backward pass keeps every layer's activations: SmolLM2 peaks at 2.3 GB here, 3.6 at 1024


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
                  max_tokens: int = FISHER_TOKENS, labels: str = "empirical", seed: int = 0) -> dict[str, torch.Tensor]:
    """Per linear (dotted name inside the model), the mean squared loss gradient of each output channel.

    A backward pass costs about three forward passes, so only the first batches up to
    `max_tokens` tokens are used: the estimate only has to rank layers, not be exact.
    """
    batches = _kept_batches(batches, max_tokens)
    layers = adapter.decoder_layers(model)
    prefix = adapter.layers
    names = [f"{prefix}.{i}.{n}" for i in range(len(layers)) for n in adapter.linear_names()]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = [_grad_recorder(model.get_submodule(n), n, sums, counts) for n in names]
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.get_submodule(adapter.input_norm).weight.requires_grad_(True)
    image_token = _image_token(model)
    generator = _generator(labels, seed, next(model.parameters()).device)
    try:
        for batch in tqdm(batches, desc="sensitivity", disable=not progress, leave=False):
            logits = model(**model_inputs(batch), use_cache=False).logits
            _next_token_loss(logits, target_labels(batch, image_token), generator).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    return {n: (sums[n] / max(counts[n], 1)) for n in names if n in sums}


def _kept_batches(batches: list[dict], max_tokens: int) -> list[dict]:
    """The first batches up to `max_tokens` tokens, split for backward passes."""
    from casp.data.calibration import first_batches

    return list(_small_batches(first_batches(batches, max_tokens)))


def _head_loss(model: nn.Module, adapter: Adapter, hidden: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-token cross-entropy from the last decoder layer's output (`casp.models.engine.head_logits`)."""
    from casp.models.engine import head_logits

    return _next_token_loss(head_logits(model, adapter, hidden), labels, generator)


def output_fisher_layerwise(model: nn.Module, adapter: Adapter, batches: list[dict], source, progress: bool = True,
                            max_tokens: int = FISHER_TOKENS, device="cpu", labels: str = "empirical",
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """`output_fisher` by backpropagation one decoder layer at a time (streamed layers, or `--device`).

    A forward walk keeps every layer's inputs (fp16, spilled to disk above the cap, when streamed);
    the loss gradient at the last layer's output is then carried back layer by layer, each layer
    loaded once more and re-run on `device` with its input requiring a gradient. Same quantity as
    `output_fisher`, up to the fp16 rounding of the kept inputs. Gradients between layers and the
    returned sums are on the CPU.
    """
    from casp.models.engine import run_layer, walk_layers
    from casp.models.offload import parts_on
    from casp.models.placement import on_device, to_device

    batches = _kept_batches(batches, max_tokens)
    layers = adapter.decoder_layers(model)
    kept, kwargs = [], []
    for step in walk_layers(model, adapter, batches, device=device, desc="sensitivity (forward)", progress=progress,
                            source=source):
        kept.append(source.keep(list(step.inputs.hidden)))
        kwargs.append(step.inputs.kwargs_for(step.layer))
        if step.index == len(layers) - 1:
            last = run_layer(step.layer, step.inputs, device)
    image_token = _image_token(model)
    generator = _generator(labels, seed, device)
    grads = []
    source.open_rest()
    try:
        with parts_on(model, adapter, device), _frozen(model):
            for h, batch in zip(last, batches):
                h = h.detach().to(device).requires_grad_(True)
                with torch.enable_grad():
                    _head_loss(model, adapter, h, target_labels(batch, image_token).to(device), generator).backward()
                grads.append(h.grad.detach().cpu())
    finally:
        source.close_rest()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="sensitivity (backward)",
                  disable=not progress, leave=False):
        layer = layers[i]
        source.fetch(i, layer)
        handles = [_grad_recorder(layer.get_submodule(n), f"{adapter.layers}.{i}.{n}", sums, counts)
                   for n in adapter.linear_names()]
        try:
            with on_device(layer, device), _frozen(layer):
                for b in range(len(grads)):
                    h = kept[i][b].detach().to(device).requires_grad_(True)
                    with torch.enable_grad():
                        out = layer(h, **to_device(kwargs[i][b], device), use_cache=False)
                        out = out[0] if isinstance(out, tuple) else out
                        out.backward(grads[b].to(device))
                    grads[b] = h.grad.detach().cpu()
        finally:
            for handle in handles:
                handle.remove()
            source.release(i, layer)
            if hasattr(kept[i], "drop"):
                kept[i].drop()
    return {n: (sums[n] / max(counts[n], 1)).cpu() for n in sums}


@contextmanager
def _frozen(module: nn.Module):
    """No parameter of `module` requires a gradient inside the block: the backward passes above only need
    the gradients of activations, and weight gradients would double their cost and hold a copy of every weight."""
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _grad_recorder(module: nn.Module, name: str, sums: dict, counts: dict):
    """Forward hook that adds the squared output gradient of `module` per channel into sums[name]."""
    def fwd(_m, _inp, out):
        def grad_hook(g):
            g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1])
            sums[name] = g2.sum(0) if name not in sums else sums[name] + g2.sum(0)
            counts[name] = counts.get(name, 0) + g2.shape[0]

        if out.requires_grad:
            out.register_hook(grad_hook)

    return module.register_forward_hook(fwd)
