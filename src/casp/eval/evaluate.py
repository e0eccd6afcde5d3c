"""`casp eval`: VQA accuracy, caption perplexity, KL vs a reference, and text perplexity."""
from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

from casp.data.image_tasks import task_of
from casp.models.adapters import adapter_for
from casp.models.offload import offloaded
from casp.errors import CaspError
from casp.io.modelio import is_compressed, load_model, load_processor, resolve_model_path, tokenizer_of

log = logging.getLogger(__name__)

EMBEDDED_KL_RECORDS = 300


def default_reference(path: Path) -> Path | None:
    """The uncompressed original of a casp output (from its report), when it is still there."""
    if not is_compressed(path):
        return None
    report = Path(path) / "report.json"
    try:
        src = Path(json.loads(report.read_text())["source"])
    except (OSError, KeyError, ValueError):
        return None
    return src if (src / "config.json").is_file() else None


def embedded_eval_records(limit: int | None = None):
    from casp.data.image_tasks import EMBEDDED

    return EMBEDDED.evaluation(limit)


def evaluate_vlm(model, processor, *, reference=None, vqa_records, caption_records=None, kl_records=None,
                 progress=True) -> dict:
    from casp.eval.vqa import caption_perplexity, kl_vs_reference, vqa_accuracy

    res = vqa_accuracy(model, processor, vqa_records, progress=progress)
    res["caption_ppl"] = caption_perplexity(model, processor, caption_records, progress=progress) if caption_records else None
    res["kl_vs_reference"] = (
        kl_vs_reference(model, reference, processor, kl_records or vqa_records[:EMBEDDED_KL_RECORDS], progress=progress)
        if reference is not None else None
    )
    return res


def evaluate(model=None, *, reference=None, vqa_jsonl=None, text=None, context_length=2048, limit=None,
             progress=True, device="cpu") -> dict:
    """The metrics of one model; with `device`, the model stays on the CPU and each decoder layer runs there."""
    with ExitStack() as stack:
        return _evaluate(model, reference, vqa_jsonl, text, context_length, limit, progress, device, stack)


def _evaluate(model, reference, vqa_jsonl, text, context_length, limit, progress, device, stack) -> dict:
    path = resolve_model_path(model)
    m = load_model(path)
    processor = load_processor(path)
    adapter = adapter_for(m)
    stack.enter_context(offloaded(m, adapter, device))
    if context_length < 2:
        raise CaspError(f"--context-length must be >= 2, got {context_length}")
    if limit is not None and limit < 1:
        raise CaspError(f"--limit must be >= 1, got {limit}")
    ref_path = resolve_model_path(reference) if reference else default_reference(path)
    res: dict = {"model": str(path), "reference": str(ref_path) if ref_path else None}
    if text or not adapter.is_multimodal:
        from casp.eval.text_ppl import text_perplexity
        from casp.data.textdata import evaluation_text, read_text_file

        try:
            body = read_text_file(text) if text else evaluation_text()
        except ValueError as e:
            raise CaspError(str(e)) from None
        res.update(text_perplexity(m, tokenizer_of(processor), body, context_length=context_length, progress=progress))
        res["text_source"] = text or "casp built-in evaluation text"
    if adapter.is_multimodal and (vqa_jsonl or not text):
        reference_model = load_model(ref_path) if ref_path else None
        if reference_model is not None:
            stack.enter_context(offloaded(reference_model, adapter_for(reference_model), device))
        if vqa_jsonl:
            from casp.eval.vqa import load_vqa_jsonl

            try:
                vqa = load_vqa_jsonl(vqa_jsonl)
            except (ValueError, OSError) as e:
                raise CaspError(str(e)) from None
            if not vqa:
                raise CaspError(f"{vqa_jsonl} holds no questions")
            captions = None
            vqa = vqa[:limit] if limit else vqa
        elif (task := task_of(path)) is not None:
            vqa, captions = task.evaluation(limit)
        else:
            raise CaspError("this model is multimodal: give --vqa-jsonl FILE (and/or --text FILE)")
        res.update(evaluate_vlm(m, processor, reference=reference_model, vqa_records=vqa, caption_records=captions,
                                progress=progress))
    return res
