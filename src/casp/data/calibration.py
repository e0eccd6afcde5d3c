"""Calibration batches: image+text JSONL, plain text, or the training records of a casp VLM's own task.

A batch is a dict of model inputs. Image records are processed one per batch through the
model's own processor (no padding, so every token is real), a question's with `labels` that score its
answer; text is cut into windows of `seq_len` tokens and batched.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from casp.data.scored import answer_labels
from casp.errors import CaspError

log = logging.getLogger(__name__)

TEXT_BATCH = 8


def read_calibration_jsonl(path: str | Path) -> list[dict]:
    """Records `{"image", "text"}` or `{"image", "question", "answer"}`; image paths relative to the file."""
    from casp.eval.vqa import read_image_jsonl

    try:
        records = read_image_jsonl(path, (("text",), ("question", "answer")))
    except OSError as e:
        raise CaspError(f"cannot read calibration file {str(path)!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise CaspError(str(e)) from None
    if not records:
        raise CaspError(f"calibration file {str(path)!r} holds no records")
    return records


def image_text_batches(processor, records: list[dict]) -> list[dict]:
    """One batch per record; a question-and-answer record's `labels` score its answer alone (`casp.data.scored`)."""
    from casp.eval.vqa import build_prompt
    from casp.io.modelio import tokenizer_of

    batches = []
    for rec in records:
        if "question" in rec:
            prompt = build_prompt(processor, rec["question"])
            text = prompt + " " + rec["answer"]
            enc = dict(processor(images=rec["image"], text=text, return_tensors="pt"))
            answer = _tokens_after(tokenizer_of(processor), prompt, text)
            enc["labels"] = answer_labels(enc["input_ids"], enc["input_ids"].shape[-1] - answer)
        else:
            enc = dict(processor(images=rec["image"], text=build_prompt(processor, rec["text"]), return_tensors="pt"))
        batches.append(enc)
    return batches


def _tokens_after(tokenizer, prompt: str, text: str) -> int:
    """How many of `text`'s last tokens lie beyond the tokens it shares with `prompt` (its answer's). Counted on
    the text alone: the processor's image tokens sit inside the shared part, so the images need no second pass."""
    a, b = tokenizer(prompt)["input_ids"], tokenizer(text)["input_ids"]
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return len(b) - shared


def text_batches(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> list[dict]:
    from casp.data.textdata import text_calibration_batches

    ids = text_calibration_batches(tokenizer, text, n_samples, seq_len, seed)
    return [{"input_ids": chunk} for chunk in torch.split(ids, TEXT_BATCH)]


def task_batches(processor, model_path: Path, n_samples: int, seed: int) -> list[dict] | None:
    """Calibration from the training records of the model's own image task (None: it has none)."""
    from casp.data.image_tasks import task_of

    task = task_of(model_path)
    return None if task is None else image_text_batches(processor, task.calibration(n_samples, seed))


def uses_builtin_text(model_path: Path, jsonl: str | None = None, text_file: str | None = None) -> bool:
    """Whether a run calibrates on casp's built-in text: a stand-in, not the user's own data."""
    from casp.data.image_tasks import task_of

    return not jsonl and not text_file and task_of(model_path) is None


def build_calibration(adapter, processor, model_path: Path, *, n_samples: int, seq_len: int, seed: int,
                      jsonl: str | None = None, text_file: str | None = None) -> list[dict]:
    """Pick the calibration source: explicit JSONL / text file, else the model's natural default."""
    from casp.io.modelio import tokenizer_of

    if jsonl and text_file:
        raise CaspError("give either --calib-jsonl or --calib-text, not both")
    if jsonl:
        if not adapter.is_multimodal:
            raise CaspError("--calib-jsonl holds images; this model is text-only (use --calib-text)")
        records = read_calibration_jsonl(jsonl)
        random.Random(seed).shuffle(records)
        batches = image_text_batches(processor, records[:n_samples])
    elif text_file:
        from casp.data.textdata import read_text_file

        try:
            text = read_text_file(text_file)
        except ValueError as e:
            raise CaspError(str(e)) from None
        batches = text_batches(tokenizer_of(processor), text, n_samples, seq_len, seed)
    elif (own := task_batches(processor, model_path, n_samples, seed)) is not None:
        batches = own
    else:
        from casp.data.textdata import calibration_text

        log.info("calibrating on casp's built-in text (give --calib-jsonl for image calibration)")
        batches = text_batches(tokenizer_of(processor), calibration_text(), n_samples, seq_len, seed)
    if not batches:
        raise CaspError("calibration data is empty")
    return batches


def first_batches(batches: list[dict], max_tokens: int) -> list[dict]:
    """The first calibration batches up to about `max_tokens` tokens (at least one)."""
    kept, used = [], 0
    for b in batches:
        if kept and used >= max_tokens:
            break
        kept.append(b)
        used += b["input_ids"].numel()
    return kept


def samples_of(batches: list[dict]) -> list[dict]:
    """The calibration samples one by one: text batches split into rows, image batches as they are."""
    samples = []
    for b in batches:
        if set(b) == {"input_ids"}:
            samples += [{"input_ids": row[None]} for row in b["input_ids"]]
        else:
            samples.append(b)
    return samples


def hold_out(batches: list[dict], n_samples: int) -> tuple[list[dict], list[dict]]:
    """Split off the last `n_samples` calibration samples, to measure on data not used for quantization."""
    samples = samples_of(batches)
    if len(samples) <= n_samples:
        raise CaspError(f"{len(samples)} calibration samples cannot spare {n_samples} for the search hold-out")

    def regroup(part):
        if all(set(s) == {"input_ids"} for s in part):
            ids = torch.cat([s["input_ids"] for s in part])
            return [{"input_ids": chunk} for chunk in torch.split(ids, TEXT_BATCH)]
        return part

    return regroup(samples[:-n_samples]), regroup(samples[-n_samples:])
