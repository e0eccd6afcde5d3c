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
The code is the package casp.embedded.train; this script only parses the flags.

At the end the model is saved in fp16 with its processor, evaluated on the
test split (VQA accuracy per type, caption perplexity, visual-token share) and
a model card README.md + metrics.json are written next to the weights.

    python scripts/train_embedded.py --out src/casp/embedded/model   # the shipped weights' settings
"""

from __future__ import annotations

import argparse
import logging

from casp.embedded.build import DEFAULTS
from casp.embedded.train import run


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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
