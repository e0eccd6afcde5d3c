"""Train fashion-vlm's projector (MobileNetV2 and Gemma-3-270M frozen) and write the weights casp ships.

    python scripts/train_fashion_projector.py                 # the shipped run's settings
    python scripts/train_fashion_projector.py --out P.safetensors --steps 50   # a quick try

Prints the validation accuracy per question type, measured through the assembled model's own
`generate`, and writes it with the settings and timings beside the weights (`.json`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    from casp.models.fashion_vlm import PROJECTOR_FILE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(PROJECTOR_FILE), help="projector weights (.safetensors) to write")
    ap.add_argument("--steps", type=int, default=300, help="answer-loss steps (each on new training panels)")
    ap.add_argument("--batch-size", type=int, default=16, help="panels per step")
    ap.add_argument("--per-type", type=int, default=2, help="questions of each type per panel")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--align-steps", type=int, default=600)
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--validation", type=int, default=300, help="validation questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    from safetensors.torch import save_file

    from casp.data.fashion_scenes import panels, records
    from casp.eval.vqa import vqa_accuracy
    from casp.models.fashion_vlm import build
    from casp.models.fashion_vlm_training import projector_state, train_projector

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    fresh = torch.nn.Sequential(torch.nn.Linear(1280, 640), torch.nn.GELU(), torch.nn.Linear(640, 640))
    model, processor = build({"linear_1.weight": fresh[0].weight.data, "linear_1.bias": fresh[0].bias.data,
                              "linear_2.weight": fresh[2].weight.data, "linear_2.bias": fresh[2].bias.data})
    stats = train_projector(model, processor, panels("train", args.steps * args.batch_size, args.seed, args.per_type),
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            align_steps=args.align_steps, align_lr=args.align_lr)
    val = vqa_accuracy(model, processor, records("validation", args.validation, args.seed))
    out = Path(args.out)
    state = projector_state(model)
    save_file(state, str(out))
    summary = {"validation_accuracy": val["vqa_accuracy"], "validation_per_type": val["per_type"],
               "validation_questions": val["n"], "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "feature_seconds": stats["feature_seconds"], "train_seconds": stats["train_seconds"],
               "total_seconds": round(time.perf_counter() - t0, 1), "bf16_autocast": stats["bf16"],
               "final_loss": sum(stats["losses"][-20:]) / len(stats["losses"][-20:])}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
