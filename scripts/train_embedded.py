#!/usr/bin/env python
"""Train the embedded tiny LLaVA from scratch on generated shape scenes (CPU).

Stage 1 (--vision-steps) trains the vision tower alone to label every patch; stage 2 trains
the projector and language model (and the tower unless --freeze-vision) on conversations,
with auxiliary losses that supervise the two steps of answering (--question-aux-weight,
--referent-aux-weight); see the model card this script writes.

Each training sequence is one scene as a multi-turn LLaVA-1.5 conversation:
    <s> USER: <image>x64 q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...
with every question of the scene (shuffled) and, with probability --caption-prob,
the caption request as the last turn. The loss is on answer / caption tokens and their
</s> only. Scenes are generated on the fly (train split, disjoint from test).

At the end the model is saved in fp16 with its processor, evaluated on the
test split (VQA accuracy per type, caption perplexity, visual-token share) and
a model card README.md + metrics.json are written next to the weights.

    python scripts/train_embedded.py --out src/casp/embedded/model   # the shipped weights' settings
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
    COUNT_WORDS,
    GRID,
    SHAPES,
    SIZES,
    generate_caption_records,
    generate_records,
    make_scene,
    questions_for,
)
from casp.eval.vqa import build_prompt, caption_perplexity, vqa_accuracy  # noqa: E402
from casp.io.storage import atomic_dir  # noqa: E402

log = logging.getLogger("train_embedded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=10000, help="maximum number of optimiser steps")
    p.add_argument("--time-budget", type=float, default=37.0,
                   help="training minutes; the LR schedule follows elapsed time and training stops when it "
                        "is spent (0: schedule by steps only). Keeps the run bounded on a shared CPU.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="scenes per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--caption-prob", type=float, default=0.25, help="probability a scene also has a caption turn")
    p.add_argument("--relation-boost", type=int, default=0, help="times each relation question is re-asked with swapped operands (later turns can copy the answer; off by default)")
    p.add_argument("--max-turns", type=int, default=99,
                   help="questions per training sequence (a random subset of the scene's): later turns can partly "
                        "read answers from earlier ones, while evaluation is single-turn")
    p.add_argument("--curriculum", type=int, default=0,
                   help="steps of curriculum: scenes hold at most 1, then 2, 3 objects before the full 1-4 mix")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary per-visual-token loss (object colour/shape/size and patch "
                        "row/column predicted from the projector output); the probe is discarded after training")
    p.add_argument("--vision-steps", type=int, default=200,
                   help="stage 1: steps training the vision tower alone on per-patch labels before the full model")
    p.add_argument("--vision-batch", type=int, default=64, help="images per stage-1 step")
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True, help="keep the vision tower fixed after stage 1")
    p.add_argument("--question-draws", type=int, default=2,
                   help="question sets drawn per scene for one training sequence (repeats dropped)")
    p.add_argument("--question-aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary loss reading the question back from the answer position")
    p.add_argument("--question-aux-layer", type=int, default=2,
                   help="decoder layer whose output feeds the question read-back heads")
    p.add_argument("--referent-aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary loss naming the queried object's attributes at the answer position")
    p.add_argument("--referent-aux-layer", type=int, default=4,
                   help="decoder layer whose output feeds the referent heads")
    p.add_argument("--referent-second", action=argparse.BooleanOptionalAction, default=True,
                   help="the referent heads also give the grid cell of a relation question's second object")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=40, help="validation scenes per periodic eval")
    p.add_argument("--test-scenes", type=int, default=250, help="test scenes for the final report (~5.3 q/scene)")
    p.add_argument("--init", default=None, help="start from the weights in this model directory (fine-tuning)")
    p.add_argument("--no-final-eval", action="store_true")
    args = p.parse_args(argv)
    for flag in ("question_aux_layer", "referent_aux_layer"):
        if not 1 <= getattr(args, flag) <= DEFAULTS["lm_layers"]:
            p.error(f"--{flag.replace('_', '-')} must name a decoder layer, 1..{DEFAULTS['lm_layers']}")
    return args


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
        ids, labels, _ = self.build_with_questions(turns)
        return ids, labels

    def build_with_questions(self, turns: list[tuple[str, str]]):
        """(ids, labels, [(index of each turn's last prompt token, that turn's question word ids)])."""
        ids = [self.bos] + self.user + [self.image] * NUM_VISUAL_TOKENS
        labels = [-100] * len(ids)
        questions = []
        for k, (q, a) in enumerate(turns):
            question = self.words(q)
            prompt = ([] if k == 0 else self.user) + question + self.assistant
            answer = self.words(a) + [self.eos]
            ids += prompt
            questions.append((len(ids) - 1, question))
            ids += answer
            labels += [-100] * len(prompt) + answer
        return ids, labels, questions


QUESTION_SLOTS = 12  # longest question, in words
REFERENT_FIELDS = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES),
                   "row": list(range(GRID)), "col": list(range(GRID))}
SECOND_FIELDS = ("row", "col")  # of the second object of a relation question
COUNT_KEYS = list(SHAPES) + list(COLORS)
_RELATION_WORDS = ("left", "right", "above", "below")


def _the_object(objects, named: set[str]):
    """The one object whose colour / shape / size words include all of `named`, or None."""
    hits = [o for o in objects if named <= {o.color, o.shape, o.size}]
    return hits[0] if len(hits) == 1 else None


def referent(objects, question: str):
    """The object a question is about (the first one named, for relations), or None.

    Questions name objects as `[size] [colour] shape`; the named words must all belong to
    exactly one object of the scene (absent objects, e.g. an `is there` answered no, give None).
    """
    words = question.split()
    if "how" in words:
        return None
    rel = next((i for i, w in enumerate(words) if w in _RELATION_WORDS), len(words) - 1)
    start = max(i for i, w in enumerate(words[:rel]) if w in ("the", "a")) + 1
    return _the_object(objects, set(words[start:rel]))


def second_referent(objects, question: str):
    """The second object a relation question names ("... left of the blue square ?"), or None."""
    words = question.split()
    if not any(w in _RELATION_WORDS for w in words):
        return None
    return _the_object(objects, set(words[max(i for i, w in enumerate(words) if w == "the") + 1 : -1]))


def referent_targets(objects, question: str) -> list[int]:
    """Class ids of REFERENT_FIELDS for the named object, then SECOND_FIELDS for the second one (-100: none)."""
    out = []
    for o, fields in ((referent(objects, question), REFERENT_FIELDS), (second_referent(objects, question),
                                                                       SECOND_FIELDS)):
        out += [-100] * len(fields) if o is None else [REFERENT_FIELDS[k].index(getattr(o, k)) for k in fields]
    return out


def scene_counts(objects) -> list[int]:
    """How many objects have each shape, then each colour (the COUNT_KEYS order)."""
    return [sum(1 for o in objects if key in (o.shape, o.color)) for key in COUNT_KEYS]


def _answer_states(hidden: torch.Tensor, pos: torch.Tensor):
    """Hidden states at every turn's last prompt token: (states [N, D], batch index [N], turn index [N])."""
    b_idx, t_idx = (pos >= 0).nonzero(as_tuple=True)
    return hidden[b_idx, pos[b_idx, t_idx]], b_idx, t_idx


class QuestionProbe(torch.nn.Module):
    """Auxiliary heads reading the whole question back from the last prompt token (training only).

    Answering needs two steps: gather the question's words at the answer position, then
    look up the matching visual tokens. Neither gets a gradient until the other works,
    which makes a long plateau; supervising the first step directly removes it.
    """

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.head = torch.nn.Linear(dim, QUESTION_SLOTS * vocab)

    def loss(self, hidden: torch.Tensor, pos: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D); pos (B, T) positions (-1 = none); words (B, T, SLOTS) ids (-100 = none)."""
        h, b_idx, t_idx = _answer_states(hidden, pos)
        logits = self.head(h).view(-1, QUESTION_SLOTS, self.vocab)
        return F.cross_entropy(logits.flatten(0, 1), words[b_idx, t_idx].flatten(), ignore_index=-100)


class ReferentProbe(torch.nn.Module):
    """Auxiliary heads naming the queried object's attributes from the answer position (training only).

    Supervises the second step of answering (finding the visual tokens the question points at) directly.
    A second set of heads gives the number of objects of every shape and every colour, from every
    answer position: the scene statistics that counting questions select from.
    """

    def __init__(self, dim: int, second: bool = False):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in REFERENT_FIELDS.items()})
        self.counts = torch.nn.Linear(dim, len(COUNT_KEYS) * len(COUNT_WORDS))
        if second:
            for k in SECOND_FIELDS:
                self.heads[f"second_{k}"] = torch.nn.Linear(dim, len(REFERENT_FIELDS[k]))

    def loss(self, hidden: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """targets (B, T, fields) class ids, -100 where a turn has no referent; counts (B, len(COUNT_KEYS))."""
        h, b_idx, t_idx = _answer_states(hidden, pos)
        tgt = targets[b_idx, t_idx]
        total = sum(F.cross_entropy(head(h), tgt[:, j], ignore_index=-100) for j, head in enumerate(self.heads.values()))
        count_logits = self.counts(h).view(-1, len(COUNT_KEYS), len(COUNT_WORDS))
        return total + F.cross_entropy(count_logits.flatten(0, 1), counts[b_idx].flatten())


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

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(h(feats).flatten(0, 1), targets[k].flatten()) for k, h in self.heads.items())


def patch_targets(scene) -> dict[str, torch.Tensor]:
    """Per-patch labels (0 = background): each object's grid cell covers PER_CELL x PER_CELL patches."""
    grid = {k: torch.zeros(PATCHES, PATCHES, dtype=torch.long) for k in ("color", "shape", "size")}
    for o in scene.objects:
        sl = (slice(PER_CELL * o.row, PER_CELL * (o.row + 1)), slice(PER_CELL * o.col, PER_CELL * (o.col + 1)))
        grid["color"][sl] = 1 + list(COLORS).index(o.color)
        grid["shape"][sl] = 1 + SHAPES.index(o.shape)
        grid["size"][sl] = 1 + list(SIZES).index(o.size)
    out = {k: v.flatten() for k, v in grid.items()}
    idx = torch.arange(PATCHES * PATCHES)
    out["row"], out["col"] = idx // PATCHES, idx % PATCHES
    return out


def pretrain_vision(model, args) -> None:
    """Stage 1: train the vision tower alone to label every patch with its cell's object.

    Cheap (64 tokens, no language model) and it hands stage 2 visual tokens that already
    separate objects by colour, shape, size and place, so the language model only has to
    learn which tokens a question points at.
    """
    tower = model.model.vision_tower
    probe = PatchProbe(tower.config.hidden_size)
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    for step in range(args.vision_steps):
        lr = args.vision_lr * min(1.0, (step + 1) / 20) * _cosine(step, args.vision_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = [make_scene("train", 50_000_000 + args.seed * 10_000_000 + step * args.vision_batch + j)
                  for j in range(args.vision_batch)]
        pix = torch.stack([scene_pixels(s.pixels) for s in scenes])
        targets = stack_patch_targets(scenes)
        feats = tower(pix, output_hidden_states=True).hidden_states[-1][:, 1:]
        loss = probe.loss(feats, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vision_steps - 1:
            with torch.no_grad():
                hits = [(probe.heads[k](feats).argmax(-1) == targets[k]).float().mean().item()
                        for k in ("color", "shape", "size")]
            log.info("vision step %d/%d loss %.4f patch acc colour/shape/size %s", step, args.vision_steps,
                     loss.item(), [round(h, 3) for h in hits])


def stack_patch_targets(scenes) -> dict[str, torch.Tensor]:
    """patch_targets of each scene, stacked into (batch, patches) tensors per label."""
    aux = [patch_targets(s) for s in scenes]
    return {k: torch.stack([a[k] for a in aux]) for k in aux[0]}


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
    seqs, pix, scenes = [], [], []
    for idx in indices:
        scene = make_scene("train", idx, max_objects=max_objects)
        scenes.append(scene)
        turns = [(q, a) for q, a, _ in scene.qa]
        seen = {q for q, _ in turns}
        for draw in range(1, args.question_draws):  # more questions about the same image, no repeats
            extra = questions_for(scene.objects, np.random.default_rng([idx, draw]))
            for q, a, _ in extra:
                if q not in seen:
                    seen.add(q)
                    turns.append((q, a))
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
        seqs.append(builder.build_with_questions(turns) + ([referent_targets(scene.objects, q) for q, _ in turns],))
        pix.append(scene_pixels(scene.pixels))
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), L), builder.pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    n_turns = max(len(s[2]) for s in seqs)
    q_pos = torch.full((len(seqs), n_turns), -1, dtype=torch.long)
    q_words = torch.full((len(seqs), n_turns, QUESTION_SLOTS), -100, dtype=torch.long)
    n_ref = len(REFERENT_FIELDS) + len(SECOND_FIELDS)
    q_ref = torch.full((len(seqs), n_turns, n_ref), -100, dtype=torch.long)
    for i, (s, lab, questions, refs) in enumerate(seqs):
        q_ref[i, : len(refs)] = torch.tensor(refs, dtype=torch.long).view(len(refs), n_ref)
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
        for t, (pos, words) in enumerate(questions):
            q_pos[i, t] = pos
            q_words[i, t, : len(words)] = torch.tensor(words[:QUESTION_SLOTS])
    counts = [scene_counts(sc.objects) for sc in scenes]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pix), "labels": labels,
            "patch_targets": stack_patch_targets(scenes), "question_pos": q_pos, "question_words": q_words,
            "question_referent": q_ref, "scene_counts": torch.tensor(counts, dtype=torch.long)}


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


def lr_at(step: int, args, elapsed: float = 0.0, budget_s: float = 0.0) -> float:
    """Linear warm-up, then cosine to 5% over whichever runs out first: steps or time budget (seconds)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if budget_s > 0:
        t = max(t, elapsed / budget_s)
    return args.lr * _cosine(min(t, 1.0))


def _cosine(done: float, total: float = 1.0) -> float:
    """Cosine decay from 1 at done=0 to 5% at done=total."""
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done / total))


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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

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
    t_start = time.time()
    if args.vision_steps:
        pretrain_vision(model, args)
    builder = SequenceBuilder(processor.tokenizer)

    probe = PatchProbe(config.text_config.hidden_size)
    qprobe = QuestionProbe(config.text_config.hidden_size, config.text_config.vocab_size)
    rprobe = ReferentProbe(config.text_config.hidden_size, second=args.referent_second)
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o))
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    params = [(n, p) for n, p in list(model.named_parameters()) + list(probe.named_parameters())
              + list(qprobe.named_parameters()) + list(rprobe.named_parameters()) if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    val_records = generate_records("validation", args.eval_scenes)

    t0 = time.time()
    budget_s = max(1.0, 60 * args.time_budget - (t0 - t_start)) if args.time_budget > 0 else 0.0
    scene_offset = args.seed * 10_000_000
    smooth = None
    steps_done = 0
    for step in range(args.steps):
        elapsed = time.time() - t0
        if budget_s and elapsed > budget_s:
            log.info("time budget of %.1f min spent after %d steps", args.time_budget, step)
            break
        model.train()
        lr = lr_at(step, args, elapsed, budget_s)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [scene_offset + step * args.batch + j for j in range(args.batch)]
        batch = make_batch(builder, idx, rng, args, max_objects_at(step, args))
        labels = batch.pop("labels")
        targets = batch.pop("patch_targets")
        q_pos, q_words, q_ref = batch.pop("question_pos"), batch.pop("question_words"), batch.pop("question_referent")
        counts = batch.pop("scene_counts")
        fwd = model(**batch, output_hidden_states=args.question_aux_weight > 0 or args.referent_aux_weight > 0)
        loss = F.cross_entropy(fwd.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        aux = probe.loss(captured.pop("feats"), targets) if args.aux_weight > 0 else torch.zeros(())
        q_aux = (qprobe.loss(fwd.hidden_states[args.question_aux_layer], q_pos, q_words)
                 if args.question_aux_weight > 0 else torch.zeros(()))
        r_aux = (rprobe.loss(fwd.hidden_states[args.referent_aux_layer], q_pos, q_ref, counts)
                 if args.referent_aux_weight > 0 else torch.zeros(()))
        loss_total = loss + args.aux_weight * aux + args.question_aux_weight * q_aux + args.referent_aux_weight * r_aux
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        steps_done = step + 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (avg %.4f) aux %.3f q-aux %.3f r-aux %.3f lr %.2e  %.1fs", step,
                     args.steps, loss.item(), smooth, aux.item(), q_aux.item(), r_aux.item(), lr, time.time() - t0)
        if args.eval_every and step > 0 and (step % args.eval_every == 0 or step == args.steps - 1):
            res = vqa_accuracy(model, processor, val_records, batch_size=64, progress=False)
            log.info("step %d val acc %.4f %s", step, res["vqa_accuracy"],
                     {k: round(v, 3) for k, v in res["per_type"].items()})
    wall = time.time() - t_start
    log.info("training done in %.1f min", wall / 60)

    with atomic_dir(out) as tmp:  # OUT appears only complete: weights, processor, and (unless skipped) card
        model.half().save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if not args.no_final_eval:
            evaluate_and_describe(tmp, args, wall, n_params, steps_done)
    return 0


def evaluate_and_describe(out: Path, args, wall: float, n_params: int, steps_done: int) -> None:
    """Reload the saved fp16 weights, measure them on the test split, write metrics.json and the card."""
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


if __name__ == "__main__":
    raise SystemExit(main())
