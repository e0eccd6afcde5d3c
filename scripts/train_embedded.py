#!/usr/bin/env python
"""Train the embedded tiny LLaVA from scratch on generated shape scenes (CPU).

Each training sequence is one scene as a multi-turn LLaVA-1.5 conversation:
    <s> USER: <image>x64 q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...
with every question of the scene (shuffled) and, half the time, the caption
request as one of the turns. The loss is on answer / caption tokens and their
</s> only. Scenes are generated on the fly (train split, disjoint from test).

At the end the model is saved in fp16 with its processor, evaluated on the
test split (VQA accuracy per type, caption perplexity, visual-token share) and
a model card README.md + metrics.json are written next to the weights.

    python scripts/train_embedded.py --out src/casp/embedded/model --steps 1500
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from casp.embedded.build import DEFAULTS, NUM_VISUAL_TOKENS, build_config, build_model, build_processor  # noqa: E402
from casp.embedded.scenes import (  # noqa: E402
    CAPTION_PROMPT,
    COLORS,
    GRID,
    SHAPES,
    SIZES,
    generate_caption_records,
    generate_records,
    make_scene,
)
from casp.eval.vqa import build_prompt, caption_perplexity, vqa_accuracy  # noqa: E402

log = logging.getLogger("train_embedded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=1500, help="maximum number of optimiser steps")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="training minutes; the LR schedule follows elapsed time and training stops when it "
                        "is spent (0: schedule by steps only). Keeps the run bounded on a shared CPU.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="scenes per step")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--caption-prob", type=float, default=0.5, help="probability a scene also has a caption turn")
    p.add_argument("--relation-boost", type=int, default=0, help="times each relation question is re-asked with swapped operands (later turns can copy the answer; off by default)")
    p.add_argument("--max-turns", type=int, default=3,
                   help="questions per training sequence (a random subset of the scene's): later turns can partly "
                        "read answers from earlier ones, while evaluation is single-turn")
    p.add_argument("--curriculum", type=int, default=0,
                   help="steps of curriculum: scenes hold at most 1, then 2, 3 objects before the full 1-4 mix")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary per-visual-token loss (object colour/shape/size and patch "
                        "row/column predicted from the projector output); the probe is discarded after training")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=60, help="validation scenes per periodic eval")
    p.add_argument("--test-scenes", type=int, default=200, help="test scenes for the final report (~5.3 q/scene)")
    p.add_argument("--init", default=None, help="start from the weights in this model directory (fine-tuning)")
    p.add_argument("--no-final-eval", action="store_true")
    return p.parse_args(argv)


class SequenceBuilder:
    """Turns scenes into (input_ids, labels) for the multi-turn training format."""

    def __init__(self, tokenizer):
        v = tokenizer.get_vocab()
        self.tok = tokenizer
        self.bos, self.eos, self.pad, self.image = v["<s>"], v["</s>"], v["<pad>"], v["<image>"]
        self.user = [v["user"], v[":"]]
        self.assistant = [v["assistant"], v[":"]]
        self.vocab = v

    def words(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.lower().split()]

    def build(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids = [self.bos] + self.user + [self.image] * NUM_VISUAL_TOKENS
        labels = [-100] * len(ids)
        for k, (q, a) in enumerate(turns):
            prompt = ([] if k == 0 else self.user) + self.words(q) + self.assistant
            answer = self.words(a) + [self.eos]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels


PATCHES = 8  # patches per side (64 / 8)
PER_CELL = PATCHES // GRID  # patches per grid cell side


class PatchProbe(torch.nn.Module):
    """Auxiliary linear heads on the projected visual tokens (training only).

    Telling each visual token what lies under it (and where it is) gives the vision
    tower a direct signal from step one, instead of waiting for the language model
    to learn to attend to the right patches; this removes the long plateau of
    from-scratch training.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({
            "color": torch.nn.Linear(dim, len(COLORS) + 1),
            "shape": torch.nn.Linear(dim, len(SHAPES) + 1),
            "size": torch.nn.Linear(dim, len(SIZES) + 1),
            "row": torch.nn.Linear(dim, PATCHES),
            "col": torch.nn.Linear(dim, PATCHES),
        })
        # every visual token also predicts the whole layout (colour / shape / size of each grid cell),
        # so scene information is spread over all tokens and reachable before attention has learned to look
        self.n_cls = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
        self.layout = torch.nn.Linear(dim, GRID * GRID * sum(self.n_cls))

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        total = sum(F.cross_entropy(h(feats).flatten(0, 1), targets[k].flatten()) for k, h in self.heads.items())
        b, t, _ = feats.shape
        logits = self.layout(feats).view(b, t, GRID * GRID, sum(self.n_cls)).split(self.n_cls, dim=-1)
        for lg, key in zip(logits, ("cell_color", "cell_shape", "cell_size")):
            tgt = targets[key][:, None, :].expand(b, t, GRID * GRID)
            total = total + F.cross_entropy(lg.flatten(0, 2), tgt.flatten())
        return total


def patch_targets(scene) -> dict[str, torch.Tensor]:
    """Per-patch labels (0 = background): each object's grid cell covers PER_CELL x PER_CELL patches."""
    grid = {k: torch.zeros(PATCHES, PATCHES, dtype=torch.long) for k in ("color", "shape", "size")}
    for o in scene.objects:
        sl = (slice(PER_CELL * o.row, PER_CELL * (o.row + 1)), slice(PER_CELL * o.col, PER_CELL * (o.col + 1)))
        grid["color"][sl] = 1 + list(COLORS).index(o.color)
        grid["shape"][sl] = 1 + SHAPES.index(o.shape)
        grid["size"][sl] = 1 + list(SIZES).index(o.size)
    out = {k: v.flatten() for k, v in grid.items()}
    for k in ("color", "shape", "size"):  # one label per grid cell for the layout head
        out[f"cell_{k}"] = grid[k][::PER_CELL, ::PER_CELL].flatten()
    idx = torch.arange(PATCHES * PATCHES)
    out["row"], out["col"] = idx // PATCHES, idx % PATCHES
    return out


def scene_pixels(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> normalised 3xHxW, identical to the processor (rescale 1/255, mean=std=0.5)."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def max_objects_at(step: int, args) -> int:
    """Curriculum: 1 object for the first quarter of --curriculum steps, then 2, then 3, then all (4)."""
    if step >= args.curriculum:
        return 4
    return 1 + (4 * step) // args.curriculum


def make_batch(builder: SequenceBuilder, indices: list[int], rng: random.Random, args, max_objects: int = 4) -> dict:
    seqs, pix, aux = [], [], []
    for idx in indices:
        scene = make_scene("train", idx, max_objects=max_objects)
        aux.append(patch_targets(scene))
        turns = [(q, a) for q, a, _ in scene.qa]
        # extra relation questions from a sibling scene draw would change the image; instead
        # repeat the scene's relation questions with swapped operands for more relational signal
        rel = [(q, a) for q, a, t in scene.qa if t == "relation"]
        for _ in range(args.relation_boost):
            for q, a in rel:
                swapped = _swap_relation(q, a)
                if swapped:
                    turns.append(swapped)
        rng.shuffle(turns)
        turns = turns[: args.max_turns]
        if rng.random() < args.caption_prob:
            # last, so no question can be answered by copying from the caption text
            turns.append((CAPTION_PROMPT, scene.caption))
        seqs.append(builder.build(turns))
        pix.append(scene_pixels(scene.pixels))
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), L), builder.pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    targets = {k: torch.stack([a[k] for a in aux]) for k in aux[0]}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pix), "labels": labels,
            "patch_targets": targets}


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _swap_relation(q: str, a: str):
    """'is the A left of the B ?' -> 'is the B right of the A ?' (same answer)."""
    body = q[len("is the "):-len(" ?")]
    for rel, inv in _INVERSE.items():
        key = f" {rel} the "
        if key in body:
            x, y = body.split(key)
            return f"is the {y} {inv} the {x} ?", a
    return None


def lr_at(step: int, args, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine to 5% over whichever runs out first: steps or time budget."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_budget > 0:
        t = max(t, elapsed / (60 * args.time_budget))
    t = min(t, 1.0)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def visual_token_share(processor, records) -> float:
    """Mean fraction of visual tokens in prompt + answer sequences."""
    shares = []
    for r in records:
        text = build_prompt(processor, r["question"]) + " " + r["answer"]
        n = len(processor.tokenizer(text.replace("<image>", "<image>" * NUM_VISUAL_TOKENS)).input_ids)
        shares.append(NUM_VISUAL_TOKENS / n)
    return float(np.mean(shares))


def write_card(out: Path, args, metrics: dict, wall_s: float, n_params: int, steps_done: int) -> None:
    per_type = "\n".join(f"| {t} | {acc:.3f} |" for t, acc in metrics["test"]["per_type"].items())
    cfg = {**DEFAULTS}
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k not in ("out", "no_final_eval") and v is not None and v is not False]
    command = "python scripts/train_embedded.py --out src/casp/embedded/model " + " ".join(flags)
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
AdamW (lr {args.lr}, {args.warmup} warm-up steps, cosine to 5%, weight decay {args.weight_decay}),
{args.batch} scenes per step, auxiliary per-visual-token loss (weight {args.aux_weight:g}: colour, shape,
size of the object under each patch, the patch's row / column, and the whole 2x2 layout from
every visual token, from the projector output
through linear heads discarded after training; it shortcuts the from-scratch plateau) ({args.curriculum} curriculum steps growing the object count
from 1 to 4), each one multi-turn conversation with up to {args.max_turns} of its questions
and a final caption turn with probability {args.caption_prob}; loss on answer / caption tokens only.{init_note} {steps_done} steps, wall time {wall_s / 60:.1f} min
on {args.threads} CPU threads (shared machine).

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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    processor = build_processor()
    config = build_config(processor.tokenizer)
    model = build_model(config, attn_implementation="sdpa")
    if args.init:
        from transformers import LlavaForConditionalGeneration

        init = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        log.info("initialised from %s", args.init)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    builder = SequenceBuilder(processor.tokenizer)

    probe = PatchProbe(config.text_config.hidden_size)
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o))
    params = list(model.named_parameters()) + list(probe.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    val_records = generate_records("validation", args.eval_scenes)

    t0 = time.time()
    scene_offset = args.seed * 10_000_000
    smooth = None
    steps_done = 0
    for step in range(args.steps):
        elapsed = time.time() - t0
        if args.time_budget > 0 and elapsed > 60 * args.time_budget:
            log.info("time budget of %.1f min spent after %d steps", args.time_budget, step)
            break
        model.train()
        lr = lr_at(step, args, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [scene_offset + step * args.batch + j for j in range(args.batch)]
        batch = make_batch(builder, idx, rng, args, max_objects_at(step, args))
        labels = batch.pop("labels")
        targets = batch.pop("patch_targets")
        logits = model(**batch).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if args.aux_weight > 0:
            aux = probe.loss(captured.pop("feats"), targets)
            loss_total = loss + args.aux_weight * aux
        else:
            aux, loss_total = torch.zeros(()), loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        steps_done = step + 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (avg %.4f) aux %.3f lr %.2e  %.1fs", step, args.steps, loss.item(),
                     smooth, aux.item(), lr, time.time() - t0)
        if args.eval_every and step > 0 and (step % args.eval_every == 0 or step == args.steps - 1):
            res = vqa_accuracy(model, processor, val_records, batch_size=64, progress=False)
            log.info("step %d val acc %.4f %s", step, res["vqa_accuracy"],
                     {k: round(v, 3) for k, v in res["per_type"].items()})
    wall = time.time() - t0
    log.info("training done in %.1f min", wall / 60)

    model.half().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if args.no_final_eval:
        return 0

    from transformers import AutoProcessor, LlavaForConditionalGeneration

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
