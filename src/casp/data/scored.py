"""Which positions of a calibration sample count: the `labels` convention of transformers.

A calibration sample of an image task (image, question and answer) carries `labels`: its token ids with -100
everywhere but the answer, as LLaVA-style training scores only the response. The sensitivity (Fisher) pass
takes its loss on them, so each linear is weighted by what the model is asked to produce, not by how it
predicts the prompt. A sample without `labels` (plain text, or an image with a caption) scores every attended
text token, as before. Held-out KL (probes, baseline check, search) and distillation keep scoring every
attended position: a few answers per sample are too few tokens to rank models on (docs/allocation.md).
"""
from __future__ import annotations

import torch

IGNORE = -100


def answer_labels(input_ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """`input_ids` with every token of the first `prompt_tokens` (the prompt, images included) set to -100."""
    labels = input_ids.clone()
    labels[..., :prompt_tokens] = IGNORE
    return labels


def model_inputs(batch: dict) -> dict:
    """The batch as the model's forward takes it: without `labels`, so that no loss is computed."""
    return {k: v for k, v in batch.items() if k != "labels"}


def target_labels(batch: dict, image_token_id: int | None) -> torch.Tensor:
    """Next-token targets for a loss: the batch's `labels`, else its ids with image tokens and padding left out."""
    if "labels" in batch:
        return batch["labels"].clone()
    labels = batch["input_ids"].clone()
    if image_token_id is not None:
        labels[labels == image_token_id] = IGNORE
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE
    return labels
