"""`casp generate`: greedy decoding of one prompt, timed against the same model made dense in memory.

A compressed model runs its casp modules (packed kernels, low-rank factors, transforms); its dense
equivalent is the same model with each outermost casp module replaced by the float32 `nn.Linear`
it computes (`io.storage.dense_equivalent`). Both decode the same inputs with HF `generate`
(greedy, KV cache, eval mode, `torch.inference_mode`).

Speed is measured on runs of exactly `max_new_tokens` tokens (end-of-sequence suppressed until
then, so every run does the same work); the answer comes from a first, untimed run that stops at
end-of-sequence and doubles as the warm-up (kernel repacking, allocator). Per run, "prefill" is
the time to the first new token and "decode" the time of tokens 2..N; tokens/s = (N - 1) / decode.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError


@dataclass
class DecodeRun:
    """One greedy generation: its new token ids, time to the first token, time of the others."""

    tokens: list[int]
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else float("nan")


class _StepClock:
    """A stopping criterion that never stops: it stamps the time at which each new token is ready."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load(model: str | Path | None):
    """(model in eval mode, processor or tokenizer, its directory) for a model argument of any casp command."""
    from casp.io.modelio import load_model, load_processor, resolve_model_path

    path = resolve_model_path(model)
    processor = load_processor(path)
    return load_model(path).eval(), processor, path


def casp_module_names(model: nn.Module) -> list[str]:
    """Names of the outermost casp modules (a packed factor inside a LowRankLinear is not listed)."""
    from casp.nn import MODULE_TYPES

    kinds = tuple(MODULE_TYPES.values())
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def densify(model: nn.Module) -> int:
    """Replace, in place, every outermost casp module by its float32 dense `nn.Linear`; return how many."""
    from casp.io.storage import dense_equivalent

    names = casp_module_names(model)
    for name in names:
        model.set_submodule(name, dense_equivalent(model.get_submodule(name)))
    return len(names)


def _is_multimodal(processor) -> bool:
    return hasattr(processor, "image_processor")


def read_image(image: str | Path):
    """The image at `image` as RGB; a missing or unreadable file is a `CaspError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(image)
    if not path.is_file():
        raise CaspError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise CaspError(f"cannot read image {str(path)!r}: {str(e).splitlines()[0]}") from None


def build_inputs(processor, prompt: str, image=None) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt: the chat template when there is one (with the image for a VLM).

    `image` is a path or a PIL image.
    """
    from casp.eval.vqa import build_prompt

    if not prompt.strip():
        raise CaspError("the prompt is empty")
    if not _is_multimodal(processor):
        if image is not None:
            raise CaspError("--image needs a multimodal model; this one is text-only")
        if getattr(processor, "chat_template", None):
            text = processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            return dict(processor(text, return_tensors="pt", add_special_tokens=False))
        return dict(processor(prompt, return_tensors="pt"))
    if image is None:
        content = [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = processor(text=[text], return_tensors="pt")
    else:
        if isinstance(image, (str, Path)):
            image = read_image(image)
        enc = processor(text=[build_prompt(processor, prompt)], images=[image], return_tensors="pt")
    enc = dict(enc)
    enc.pop("token_type_ids", None)
    return enc


def _check_length(model: nn.Module, inputs: dict, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise CaspError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    total = inputs["input_ids"].shape[1] + max_new_tokens
    if limit is not None and total > limit:
        raise CaspError(f"prompt ({inputs['input_ids'].shape[1]} tokens) + {max_new_tokens} new tokens exceed "
                        f"the model's {limit} positions")


def greedy_decode(model: nn.Module, inputs: dict, max_new_tokens: int, fixed_length: bool = False) -> DecodeRun:
    """One greedy `generate` with a KV cache, timed per token; `fixed_length` suppresses an early end."""
    from transformers import StoppingCriteriaList

    clock = _StepClock()
    extra = {"min_new_tokens": max_new_tokens} if fixed_length else {}
    gen_cfg = model.generation_config
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([clock]), **extra)
    stamps = clock.stamps
    return DecodeRun(out[0, inputs["input_ids"].shape[1]:].tolist(), stamps[0] - start, stamps[-1] - stamps[0])


def measure(model: nn.Module, inputs: dict, max_new_tokens: int, repeats: int) -> dict:
    """The model's greedy answer (untimed warm-up) and the medians of `repeats` fixed-length timed runs."""
    if repeats < 1:
        raise CaspError(f"--repeats must be at least 1, got {repeats}")
    _check_length(model, inputs, max_new_tokens)
    answer = greedy_decode(model, inputs, max_new_tokens)
    runs = [greedy_decode(model, inputs, max_new_tokens, fixed_length=True) for _ in range(repeats)]
    return {"tokens": answer.tokens, "new_tokens": len(runs[0].tokens),
            "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
            "runs_tokens_per_s": [r.tokens_per_s for r in runs],
            "prefill_s": statistics.median(r.prefill_s for r in runs)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_generate(model: str | Path | None, prompt: str, image: str | Path | None = None, max_new_tokens: int = 32,
                 repeats: int = 3, seed: int = 0, threads: int | None = None) -> dict:
    """`casp generate`: answer and decode tokens/s of the model, then of its dense equivalent (same inputs).

    For an uncompressed model the dense model is the model itself: its speed is reported for both.
    """
    if threads is not None:
        if threads < 1:
            raise CaspError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if not prompt.strip():
        raise CaspError("the prompt is empty")
    picture = read_image(image) if image is not None else None
    torch.manual_seed(seed)
    net, processor, path = load(model)
    inputs = build_inputs(processor, prompt, picture)
    tokenizer = getattr(processor, "tokenizer", processor)
    own = measure(net, inputs, max_new_tokens, repeats)
    replaced = densify(net)
    dense = measure(net, inputs, max_new_tokens, repeats) if replaced else own
    return {
        "text": tokenizer.decode(own["tokens"], skip_special_tokens=True).strip(),
        "tokens_per_s": own["tokens_per_s"],
        "dense_tokens_per_s": dense["tokens_per_s"],
        "dense_text": tokenizer.decode(dense["tokens"], skip_special_tokens=True).strip(),
        "prefill_s": own["prefill_s"],
        "dense_prefill_s": dense["prefill_s"],
        "new_tokens": own["new_tokens"],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "compressed_modules": replaced,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "model": str(path),
    }
