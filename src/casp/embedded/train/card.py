"""The embedded model's results: test-split evaluation, ``metrics.json`` and the model card ``README.md``.

Run on the saved fp16 weights (reloaded as float32, as users load them), so the card reports
what ships. The card's training command is rebuilt from the run's arguments, so rerunning it
reproduces the settings (a test checks the shipped card against the script's defaults).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from casp.embedded.build import DEFAULTS, NUM_VISUAL_TOKENS
from casp.embedded.scenes import CAPTION_PROMPT, generate_caption_records, generate_records
from casp.eval.vqa import build_prompt, caption_perplexity, vqa_accuracy

log = logging.getLogger(__name__)


def describe(out: Path, args, wall: float, n_params: int, steps_done: int) -> None:
    """Reload the saved fp16 weights, measure them on the test split, write metrics.json and the card."""
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    test = generate_records("test", args.test_scenes)
    captions = generate_caption_records("test", args.test_scenes)
    res = vqa_accuracy(model, processor, test, batch_size=64, progress=False)
    ppl = caption_perplexity(model, processor, captions, batch_size=32, progress=False)
    metrics = {
        "test": res,
        "caption_ppl": ppl,
        "visual_token_share_vqa": visual_token_share(processor, test),
        "visual_token_share_caption": visual_token_share(processor, captions),
        "vocab_size": len(processor.tokenizer),
        "train_wall_s": wall,
        "steps": steps_done,
        "seed": args.seed,
    }
    log.info("test: %s", json.dumps(metrics))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(out, args, metrics, wall, n_params, steps_done)


def visual_token_share(processor, records) -> float:
    """Mean fraction of visual tokens in prompt + answer sequences."""
    shares = []
    for r in records:
        text = build_prompt(processor, r["question"]) + " " + r["answer"]
        n = len(processor.tokenizer(text.replace("<image>", "<image>" * NUM_VISUAL_TOKENS)).input_ids)
        shares.append(NUM_VISUAL_TOKENS / n)
    return float(np.mean(shares))


def write_card(out: Path, args, metrics: dict, wall_s: float, n_params: int, steps_done: int) -> None:
    """The model card README.md: architecture, prompt format, data, training command and stages, test results."""
    per_type = "\n".join(f"| {t} | {acc:.3f} |" for t, acc in metrics["test"]["per_type"].items())
    cfg = {**DEFAULTS}
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}" if v is False
             else f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k not in ("out", "no_final_eval") and v is not None]
    command = "python scripts/train_embedded.py --out src/casp/embedded/model " + " ".join(flags)
    frozen = "frozen" if args.freeze_vision else "trained too"
    second_note = " (and the cell of a relation's second object)" if args.referent_second else ""
    init_note = f" Initialised from the weights in `{args.init}` (a previous stage)." if args.init else ""
    card = f"""# casp embedded tiny LLaVA

A `LlavaForConditionalGeneration` trained from scratch on CPU on synthetic 64x64 shape
scenes (`casp.embedded.scenes`). It is casp's offline reference vision-language model:
small enough to compress in seconds, real enough that compression errors show up in
its accuracy.

## Architecture ({n_params / 1e6:.2f} M parameters, fp16 on disk)
- Vision tower: CLIP ViT, image 64x64, patch 8 (64 patches + CLS), hidden {cfg['vision_hidden']},
  {cfg['vision_layers']} layers, {cfg['vision_heads']} heads; features from the last layer,
  strategy `default` (CLS dropped) -> **{NUM_VISUAL_TOKENS} visual tokens per image**.
- Projector: 2-layer MLP, GELU.
- Language model: Llama, hidden {cfg['lm_hidden']}, intermediate {cfg['lm_intermediate']},
  {cfg['lm_layers']} layers, {cfg['lm_heads']} query heads / {cfg['lm_kv_heads']} KV heads (GQA),
  word-level vocabulary of {metrics['vocab_size']} tokens.
- `attn_implementation` "eager" and "sdpa" both work.

## Prompt format (LLaVA-1.5)
```
USER: <image>\\n{{question}} ASSISTANT:
```
The tokenizer prepends `<s>`; the processor expands `<image>` to {NUM_VISUAL_TOKENS} image tokens;
answers end with `</s>`. `processor.apply_chat_template([{{"role": "user", "content":
[{{"type": "image"}}, {{"type": "text", "text": q}}]}}], add_generation_prompt=True)` produces
the prompt. Captions are requested with the question `{CAPTION_PROMPT}`.

## Data
Scenes: 1-4 objects (square, circle, triangle, cross; red, green, blue, yellow, purple,
white; small or large) on a 2x2 grid of 32-pixel cells (one object per cell). Question types: color, count,
exists, position (quadrant), relation (left of / right of / above / below -> yes/no),
plus a caption. Train / validation / test use base seeds 1000 / 2000 / 3000 and are
disjoint by content (a hash of each scene's object list assigns it to one split).

## Training
```
{command}
```
Two stages, {wall_s / 60:.1f} min wall time in all on {args.threads} CPU threads.

1. **Vision tower alone** ({args.vision_steps} steps, {args.vision_batch} images each, AdamW lr {args.vision_lr}):
   linear heads on its last hidden state label every patch with the colour, shape and size of the
   object in its grid cell (or background) and the patch's row and column.
2. **Projector and language model** ({steps_done} steps, vision tower {frozen}, AdamW lr {args.lr}, {args.warmup} warm-up
   steps, cosine to 5% over the time budget, weight decay {args.weight_decay}, {args.batch} scenes per step):
   each scene is one multi-turn conversation with all of its questions ({args.question_draws} question
   set(s) drawn per scene, repeats dropped, shuffled) and, with probability {args.caption_prob}, a final caption turn;
   loss on answer / caption tokens only. Three auxiliary losses, their heads discarded after training:
   the same per-patch labels from the projector output (weight {args.aux_weight:g}); every question read back
   word by word from the last prompt token's hidden state after decoder layer {args.question_aux_layer} (weight
   {args.question_aux_weight:g}); and, from the same position after layer {args.referent_aux_layer} (weight
   {args.referent_aux_weight:g}), the colour, shape, size and cell of the object the question names{second_note} plus the
   number of objects of every shape and colour. Answering needs the question gathered at the answer
   position *and* a lookup of the matching visual tokens; neither step gets a gradient until the other
   works, and without these losses from-scratch runs sat at chance on most question types for the whole
   CPU budget.{init_note}

## Measured on the test split ({metrics['test']['n']} questions, {args.test_scenes} scenes)
Greedy decoding, normalised exact match (`casp.eval.vqa.vqa_accuracy`), fp16 weights loaded as float32.

| question type | accuracy |
|---|---|
{per_type}
| **all** | **{metrics['test']['vqa_accuracy']:.3f}** |

- Caption perplexity (test captions, `casp.eval.vqa.caption_perplexity`): {metrics['caption_ppl']:.3f}
- Visual-token share of a VQA sequence (prompt + answer): {metrics['visual_token_share_vqa']:.3f};
  of a caption sequence: {metrics['visual_token_share_caption']:.3f}
"""
    (out / "README.md").write_text(card)
