"""Training of the embedded tiny LLaVA from scratch on generated shape scenes (CPU).

``run(args)`` is the whole job behind ``scripts/train_embedded.py``; ``args`` is that script's
parsed flags (their defaults are the shipped run's settings). One module per job:

- ``data``: scenes -> multi-turn conversations in the processor's chat template -> token batches.
- ``probes``: the auxiliary heads that make from-scratch training converge, and their targets.
- ``loop``: stage 1 (vision tower alone) and stage 2 (projector + language model), with validation.
- ``card``: the final test-split evaluation, ``metrics.json`` and the model card.

The same seed and flags give the same batches, losses and weights (with ``--time-budget 0``;
otherwise the schedule and the number of steps follow wall time).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from casp.embedded.build import build_config, build_model, build_processor
from casp.embedded.train.card import describe
from casp.embedded.train.loop import pretrain_vision, train_language
from casp.io.storage import atomic_dir

log = logging.getLogger(__name__)


def run(args) -> int:
    """Train, save the fp16 weights with the processor in ``args.out``, evaluate and write the card; returns 0.

    ``args.out`` appears only complete (written to a temporary directory, then renamed): a run that
    fails, in training or in the final evaluation, leaves nothing there.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    processor = build_processor()
    model = build_model(build_config(processor.tokenizer), attn_implementation="sdpa")
    if args.init:
        init = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        log.info("initialised from %s", args.init)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    t_start = time.time()
    if args.vision_steps:
        pretrain_vision(model, processor, args)
    steps_done = train_language(model, processor, args, t_start)
    wall = time.time() - t_start
    log.info("training done in %.1f min", wall / 60)

    with atomic_dir(out) as tmp:
        model.half().save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if not args.no_final_eval:
            describe(tmp, args, wall, n_params, steps_done)
    return 0


__all__ = ["run"]
