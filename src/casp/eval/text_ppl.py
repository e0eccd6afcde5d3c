"""Token-level perplexity of a causal LM over a text, in non-overlapping windows.

The text is tokenised once without special tokens and cut into consecutive windows of
`context_length` tokens (the last one shorter). Each window is an independent forward pass
with no context carried over, so the first token of every window has no prediction: a window
of L tokens contributes L - 1 predicted tokens. `tokens` counts exactly those predictions and
`text_ppl = exp(sum of their negative log-likelihoods / tokens)`. This is the usual
"non-overlapping chunks" protocol (not a sliding window, not word-level perplexity).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from casp.data.textdata import tokenize_text


def max_positions(model) -> int | None:
    """The model's `max_position_embeddings` (of its text config for VLMs), if it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def split_windows(n_tokens: int, context_length: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) windows covering n_tokens; windows of one token predict nothing."""
    return [
        (s, min(s + context_length, n_tokens))
        for s in range(0, n_tokens, context_length)
        if min(s + context_length, n_tokens) - s >= 2
    ]


@torch.inference_mode()
def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float64) of each row of `input_ids` [b, L]."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.double().sum(dim=1).cpu()


def text_perplexity(
    model,
    tokenizer,
    text: str,
    context_length: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
    max_tokens: int | None = None,
) -> dict:
    """Token perplexity of `model` on `text` over non-overlapping windows (see module doc).

    The window is `context_length`, reduced to the model's `max_position_embeddings` if smaller.
    `max_tokens` keeps only the first tokens of the text (for quick checks). Run a float32 model
    on CPU for numbers comparable with ours; logits are scored in float32 whatever the model.
    Returns {"text_ppl", "context_length", "tokens" (predicted tokens), "windows"}.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_positions(model)
    ctx = min(context_length, limit) if limit else context_length
    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = split_windows(ids.numel(), ctx)
    if not windows:
        raise ValueError(f"text has {ids.numel()} token(s): nothing to predict")

    # Group equal-length windows into batches (all full windows, then the shorter last one).
    batches: list[list[tuple[int, int]]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0]) == (w[1] - w[0]):
            last.append(w)
        else:
            batches.append([w])

    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        bar = tqdm(total=len(windows), desc=f"text ppl (ctx {ctx})", unit="win", disable=not progress)
        for group in batches:
            chunk = torch.stack([ids[s:e] for s, e in group])
            total_nll += float(window_nll(model, chunk).sum())
            total_tokens += chunk.shape[0] * (chunk.shape[1] - 1)
            bar.update(len(group))
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
        bar.close()
    finally:
        model.train(was_training)
    return {
        "text_ppl": math.exp(total_nll / total_tokens),
        "context_length": ctx,
        "tokens": total_tokens,
        "windows": len(windows),
    }
