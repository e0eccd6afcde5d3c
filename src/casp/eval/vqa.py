"""VQA accuracy, caption perplexity and KL-to-reference for LLaVA-family models.

All functions take a Hugging Face model and its processor, and records of the
form ``{"image": PIL.Image, "question": str, "answer": str, "type": str}``; "image" may be a list
for a model whose prompt holds several images (fashion-vlm's panels) (``load_vqa_jsonl`` reads such records from a user's JSONL file). They work
for the embedded tiny LLaVA and for real LLaVA checkpoints alike, on CPU in
float32 or on an accelerator.

Teacher-forced scoring (``caption_perplexity``, ``kl_vs_reference``) feeds
``prompt + " " + answer`` and scores the tokens after the prompt, i.e. the
answer tokens only; no end-of-sequence token is appended.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LLAVA15_PROMPT = "USER: {image}\n{question} ASSISTANT:"
DEFAULT_CAPTION_PROMPT = "describe the image ."
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def build_prompt(processor, question: str) -> str:
    """Generation prompt for one image + question: the processor's chat template, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return LLAVA15_PROMPT.format(image=image_token, question=question)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (the exact-match normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def read_image_jsonl(path: str | Path, layouts: tuple[tuple[str, ...], ...]) -> list[dict]:
    """Read JSON lines holding "image" plus the fields of one of `layouts`; images opened as RGB PIL images.

    Relative image paths are resolved against the JSONL's folder. A malformed line, a record
    matching no layout, or an unreadable image raises ``ValueError`` naming the line.
    """
    path = Path(path)
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image_path = row["image"]
                if not any(all(k in row for k in layout) for layout in layouts):
                    raise KeyError(" or ".join("+".join(layout) for layout in layouts))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                fields = " or ".join(", ".join(layout) for layout in layouts)
                raise ValueError(f"{path}:{lineno}: expected a JSON object with image and {fields} ({e})") from None
            image_file = Path(image_path)
            if not image_file.is_absolute():
                image_file = path.parent / image_file
            try:
                with Image.open(image_file) as im:
                    image = im.convert("RGB")
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {image_file} ({path}:{lineno}): {e}") from None
            records.append(dict(row, image=image))
    return records


def load_vqa_jsonl(path: str | Path) -> list[dict]:
    """Read ``{"image", "question", "answer"[, "type"]}`` lines; records without "type" get type "all"."""
    return [
        {"image": r["image"], "question": str(r["question"]), "answer": str(r["answer"]), "type": r.get("type", "all")}
        for r in read_image_jsonl(path, (("question", "answer"),))
    ]


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@contextmanager
def _padding(tokenizer, side: str):
    """Temporarily set the padding side (and a pad token if the tokenizer has none)."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        yield
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


def _encode(processor, texts: list[str], images: list, model) -> dict:
    enc = processor(text=texts, images=[_rgb(im) for im in images], return_tensors="pt", padding=True)
    enc = dict(enc)
    enc.pop("token_type_ids", None)
    device, dtype = _device_dtype(model)
    out = {}
    for k, v in enc.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _rgb(image):
    """An RGB PIL image from a path or image; a list (a record of several images) image by image."""
    if isinstance(image, (list, tuple)):
        return [_rgb(im) for im in image]
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def _batches(records: list[dict], batch_size: int, progress: bool, desc: str) -> Iterator[list[dict]]:
    starts = range(0, len(records), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield records[s : s + batch_size]


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], batch_size: int = 32, max_new_tokens: int = 4,
                     progress: bool = True) -> list[str]:
    """Greedy answers (decoded, special tokens stripped) for each record, batched with left padding."""
    model.eval()
    tokenizer = processor.tokenizer
    answers: list[str] = []
    with _padding(tokenizer, "left"):
        for batch in _batches(records, batch_size, progress, "vqa"):
            prompts = [build_prompt(processor, r["question"]) for r in batch]
            enc = _encode(processor, prompts, [r["image"] for r in batch], model)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def vqa_accuracy(model, processor, records: list[dict], batch_size: int = 32, max_new_tokens: int = 4,
                 progress: bool = True) -> dict:
    """Normalised exact-match accuracy of greedy answers, overall and per record "type"."""
    answers = generate_answers(model, processor, records, batch_size, max_new_tokens, progress)
    hits: dict[str, list[int]] = {}
    for r, a in zip(records, answers):
        ok = int(normalize_answer(a) == normalize_answer(r["answer"]))
        hits.setdefault(r.get("type", "all"), []).append(ok)
    total = sum(sum(h) for h in hits.values())
    n = len(records)
    return {
        "vqa_accuracy": total / n if n else float("nan"),
        "per_type": {t: sum(h) / len(h) for t, h in sorted(hits.items())},
        "n": n,
    }


def _teacher_forced_inputs(processor, batch: list[dict], model, default_prompt: str):
    """Encode prompt + answer (right padded); return inputs and per-row (start, end) of answer tokens."""
    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, r.get("question") or default_prompt) for r in batch]
    fulls = [p + " " + r["answer"].strip() for p, r in zip(prompts, batch)]
    images = [r["image"] for r in batch]
    with _padding(tokenizer, "right"):
        enc_full = _encode(processor, fulls, images, model)
        enc_prompt = processor(text=prompts, images=[_rgb(im) for im in images], return_tensors="pt", padding=True)
    spans = []
    full_ids = enc_full["input_ids"].cpu()
    for i in range(len(batch)):
        n_full = int(enc_full["attention_mask"][i].sum())
        n_prompt = int(enc_prompt["attention_mask"][i].sum())
        prompt_ids = enc_prompt["input_ids"][i, :n_prompt]
        # the answer starts where full and prompt tokenisations first differ
        same = (full_ids[i, :n_prompt] == prompt_ids).long()
        start = int(same.cumprod(0).sum())
        spans.append((start, n_full))
    return enc_full, spans


def _answer_logprobs(model, enc: dict, spans) -> list[torch.Tensor]:
    """Per row: log-probabilities [n_answer, vocab] of the distributions that predict the answer tokens."""
    logits = model(**enc).logits
    return [F.log_softmax(logits[i, s - 1 : e - 1].double(), dim=-1) for i, (s, e) in enumerate(spans)]


@torch.no_grad()
def caption_perplexity(model, processor, records: list[dict], batch_size: int = 8, progress: bool = True) -> float:
    """exp(mean NLL) of the caption tokens (record "answer") given the image and the caption prompt.

    The prompt is the record's "question" (default ``DEFAULT_CAPTION_PROMPT``).
    """
    model.eval()
    nll, count = 0.0, 0
    for batch in _batches(records, batch_size, progress, "caption ppl"):
        enc, spans = _teacher_forced_inputs(processor, batch, model, DEFAULT_CAPTION_PROMPT)
        logps = _answer_logprobs(model, enc, spans)
        for i, ((s, e), lp) in enumerate(zip(spans, logps)):
            targets = enc["input_ids"][i, s:e].to(lp.device)
            nll -= float(lp.gather(1, targets[:, None]).sum())
            count += e - s
    if count == 0:
        raise ValueError("no caption tokens to score")
    return math.exp(nll / count)


@torch.no_grad()
def kl_vs_reference(model, reference, processor, records: list[dict], batch_size: int = 8,
                    progress: bool = True) -> float:
    """Mean over answer-token positions of KL(P_reference || P_model) of the next-token distributions.

    Both models are teacher-forced on ``prompt + " " + answer``; positions are those
    that predict the answer tokens (the first answer token included).
    """
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    for batch in _batches(records, batch_size, progress, "kl"):
        enc, spans = _teacher_forced_inputs(processor, batch, model, DEFAULT_CAPTION_PROMPT)
        ref_enc, _ = _teacher_forced_inputs(processor, batch, reference, DEFAULT_CAPTION_PROMPT)
        lp_model = _answer_logprobs(model, enc, spans)
        lp_ref = _answer_logprobs(reference, ref_enc, spans)
        for a, b in zip(lp_ref, lp_model):
            b = b.to(a.device)
            vocab = min(a.shape[-1], b.shape[-1])  # padded vocabularies may differ in size
            a, b = a[:, :vocab], b[:, :vocab]
            total += float((a.exp() * (a - b)).sum())
            count += a.shape[0]
    if count == 0:
        raise ValueError("no answer tokens to compare")
    return total / count
