"""The built-in real VLM (fashion-vlm) under every method, one run, one table.

Rows: FP; RTN 4-bit; uniform GPTQ 3- and 4-bit (g128); allocation alone and CASP+GPTQ at --gptq-target;
E8 uniform 2- and 3-bit (incoherence); E8 allocation alone and CASP+E8 at each of --e8-targets. Each row
runs in its own process (its own peak RSS) with --threads torch threads, calibrates on --calib-samples pictures of the training split (the
model's own task: image, question and answer), and reports measured average bits (every stored bit),
exact-match accuracy per question type on --questions held-out test questions, KL(FP ‖ model) on the
answers of the first --kl-records of them, compression seconds and peak RSS.

Usage: python benchmarks/real_vlm.py [--model fashion-vlm] [--rows LABEL,...] [--calib-samples 128]
       [--questions 600] [--shared-plan] [--json FILE]
--shared-plan runs the rows in this process, rows that differ only in target bits sharing one measured plan
when their candidate ladders are the same (2.0 and 2.5 do; 3.25 and 4.25 do not) (their seconds then leave
out the plan; peak RSS is the process's so far).
"""
from __future__ import annotations

import argparse
import json
import time

from vector_quant import add_shared_plan, rows_in_own_processes, tuning_of, write_rows


def specs(gptq_target: float, e8_targets: list[float]) -> list[dict]:
    e8 = {"quantizer": "e8", "transform": "incoherence"}
    rows = [{"label": "FP"},
            {"label": "RTN 4-bit", "quantizer": "rtn", "bits": 4, "allocation": "uniform", "qk_rank": 0},
            {"label": "GPTQ uniform 3-bit", "quantizer": "gptq", "bits": 3, "allocation": "uniform", "qk_rank": 0},
            {"label": "GPTQ uniform 4-bit", "quantizer": "gptq", "bits": 4, "allocation": "uniform", "qk_rank": 0},
            {"label": f"GPTQ allocation alone @ {gptq_target}", "quantizer": "gptq", "bits": gptq_target,
             "allocation": "rd", "qk_rank": 0},
            {"label": f"CASP+GPTQ @ {gptq_target}", "quantizer": "gptq", "bits": gptq_target, "allocation": "rd",
             "qk_rank": "joint"},
            {**e8, "label": "E8 uniform 2-bit", "bits": 2, "allocation": "uniform", "qk_rank": 0},
            {**e8, "label": "E8 uniform 3-bit", "bits": 3, "allocation": "uniform", "qk_rank": 0}]
    for t in e8_targets:
        rows += [{**e8, "label": f"E8 allocation alone @ {t}", "bits": t, "allocation": "rd", "qk_rank": 0},
                 {**e8, "label": f"CASP+E8 @ {t}", "bits": t, "allocation": "rd", "qk_rank": "joint"}]
    return rows


def run_row(spec: dict, args, cache: dict | None = None) -> dict:
    """One row in this process: compress (unless FP), then accuracy per type and KL on the test questions.

    `cache` (--shared-plan, here or in `benchmarks/finetune.py`) lets rows that differ only in target or tuning share one
    measured plan."""
    import torch

    torch.set_num_threads(args.threads)
    from casp.config import CompressionConfig
    from casp.data.image_tasks import task_of
    from casp.eval.evaluate import evaluate_vlm
    from casp.io.modelio import load_model, load_processor, resolve_model_path
    from casp.models.engine import peak_rss_mb
    from casp.pipeline import compress
    from casp.run import RunOptions

    path = resolve_model_path(None if args.model == "embedded" else args.model)
    processor = load_processor(path)
    reference = load_model(path)
    model, report, t0 = reference, None, time.time()
    if spec["label"] != "FP":
        cfg = CompressionConfig(bits=spec["bits"], quantizer=spec["quantizer"], allocation=spec["allocation"],
                                qk_rank=spec["qk_rank"], transform=spec.get("transform"), seed=args.seed,
                                calib_samples=args.calib_samples, **tuning_of(spec),
                                layers=tuple(spec["layers"]) if spec.get("layers") else None)
        res = compress(load_model(path), None, cfg, processor=processor, progress=False, options=RunOptions(cache=cache))
        model, report = res.model, res.report
    seconds = time.time() - t0
    vqa, _ = task_of(path).evaluation(args.questions)
    r = evaluate_vlm(model, processor, reference=reference if report else None, vqa_records=vqa,
                     kl_records=vqa[: args.kl_records], progress=False)
    return {"method": spec["label"], "average_bits": report["average_bits"] if report else 16.0,
            "accuracy": r["vqa_accuracy"], "per_type": r["per_type"], "kl": r["kl_vs_reference"] or 0.0,
            "seconds": seconds if report else 0.0, "peak_rss_mb": peak_rss_mb(),
            "baseline_check": (report or {}).get("baseline_check"),
            "phase_seconds": (report or {}).get("phase_seconds"), "finetune": (report or {}).get("finetune"),
            "e2e": (report or {}).get("e2e")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion-vlm", help="a VLM with its own image task (fashion-vlm, embedded)")
    ap.add_argument("--rows", default="all", help="comma-separated row labels (default: all)")
    ap.add_argument("--gptq-target", type=float, default=3.25)
    ap.add_argument("--e8-targets", default="2.0,2.5,3.25,4.25")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--kl-records", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    add_shared_plan(ap)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--one-row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_row:
        print(json.dumps(run_row(json.loads(args.one_row), args)))
        return
    rows = specs(args.gptq_target, [float(t) for t in args.e8_targets.split(",")])
    if args.rows != "all":
        rows = [r for r in rows if r["label"] in args.rows.split(",")]
    from casp.data import fashion_scenes

    types = fashion_scenes.TYPES
    print(f"model {args.model}; calibration {args.calib_samples} training pictures; {args.questions} test questions; "
          f"{args.threads} torch thread(s)\n")
    print(f"| method | average bits | accuracy | {' | '.join(types)} | KL vs FP | compress s | peak RSS MB |")
    print("|---|---|---|" + "---|" * len(types) + "---|---|---|", flush=True)

    def show(r):
        per = " | ".join(f"{r['per_type'].get(t, float('nan')):.3f}" for t in types)
        print(f"| {r['method']} | {r['average_bits']:.3f} | {r['accuracy']:.3f} | {per} | {r['kl']:.4f} | "
              f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |", flush=True)

    in_process = (lambda spec, cache: run_row(spec, args, cache)) if args.shared_plan else None
    write_rows(args.json, rows_in_own_processes(__file__, rows, show, in_process))


if __name__ == "__main__":
    main()
