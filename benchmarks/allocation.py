"""Which bit allocation is better? Rate-distortion (per matrix / per layer) vs the paper's rule vs uniform.

All rows use GPTQ and low-rank Q/K 0.25 except where noted, on the embedded model, at the same targets;
prints VQA accuracy, KL vs FP and the measured average bits, from one run.

Usage: python benchmarks/allocation.py [--questions N] [--targets 2.0,3.0]
"""
from __future__ import annotations

import argparse
import time

from casp.config import CompressionConfig
from casp.embedded import EMBEDDED_MODEL_DIR
from casp.eval.evaluate import embedded_eval_records, evaluate_vlm
from casp.io.modelio import load_model, load_processor
from casp.pipeline import compress
from casp.run import RunOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--targets", default="2.0,3.0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    reference = load_model(EMBEDDED_MODEL_DIR)
    processor = load_processor(EMBEDDED_MODEL_DIR)
    vqa, _ = embedded_eval_records()
    vqa = vqa[: args.questions]
    cache: dict = {}
    print(f"embedded model, {len(vqa)} test questions, KL vs FP on the first 200\n")
    print("| target | allocation | average bits | VQA acc | KL vs FP | seconds |")
    print("|---|---|---|---|---|---|")
    for target in (float(t) for t in args.targets.split(",")):
        rows = [
            ("rd, per matrix", dict(allocation="rd", granularity="matrix")),
            ("rd, per layer", dict(allocation="rd", granularity="layer")),
            ("paper rule", dict(allocation="paper")),
        ]
        for label, kw in rows:
            t = time.time()
            cfg = CompressionConfig(bits=target, quantizer="gptq", qk_rank=0.25, seed=args.seed, **kw)
            res = compress(None, None, cfg, progress=False, options=RunOptions(cache=cache))
            secs = time.time() - t
            ev = evaluate_vlm(res.model, processor, reference=reference, vqa_records=vqa, kl_records=vqa[:200],
                              progress=False)
            print(f"| {target} | {label} | {res.report['average_bits']:.3f} | {ev['vqa_accuracy']:.4f} | "
                  f"{ev['kl_vs_reference']:.5f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
