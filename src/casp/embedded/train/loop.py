"""The two training stages of the embedded model and their optimisation loops.

Stage 1 (``--vision-steps``) trains the vision tower alone to label every patch; stage 2
trains the projector and language model (and the tower unless ``--freeze-vision``) on
conversations, with the auxiliary losses of ``probes`` and a periodic validation accuracy.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
import torch.nn.functional as F

from casp.embedded.scenes import generate_records, make_scene
from casp.embedded.train.data import ConversationEncoder, make_batch, max_objects_at, pixel_values
from casp.embedded.train.probes import PatchProbe, QuestionProbe, ReferentProbe, stack_patch_targets
from casp.eval.vqa import vqa_accuracy

log = logging.getLogger(__name__)


def _cosine(done: float, total: float = 1.0) -> float:
    """Cosine decay from 1 at done=0 to 5% at done=total."""
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done / total))


def lr_at(step: int, args, elapsed: float = 0.0, budget_s: float = 0.0) -> float:
    """Linear warm-up, then cosine to 5% over whichever runs out first: steps or time budget (seconds)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if budget_s > 0:
        t = max(t, elapsed / budget_s)
    return args.lr * _cosine(min(t, 1.0))


def pretrain_vision(model, processor, args) -> None:
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
        pix = pixel_values(processor, scenes)
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


def train_language(model, processor, args, started: float) -> int:
    """Stage 2: projector and language model on conversations, with the auxiliary losses; returns steps done.

    The learning rate follows ``lr_at`` over ``--steps`` or the time left of ``--time-budget``
    (counted from ``started``, the start of stage 1), and training stops when either is spent.
    """
    config = model.config
    rng = random.Random(args.seed)
    encoder = ConversationEncoder(processor)
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
    budget_s = max(1.0, 60 * args.time_budget - (t0 - started)) if args.time_budget > 0 else 0.0
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
        batch = make_batch(encoder, idx, rng, args, max_objects_at(step, args))
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
    return steps_done
