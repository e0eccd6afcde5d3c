"""Ablation on a real pretrained LM (smollm2-135m): what each part of CASP buys, at equal honest bits.

One table from one run. Each row: token perplexity on casp's built-in evaluation text (non-overlapping
windows of --ctx tokens), measured average bits (every stored bit of the compressed decoder linears:
codes, scales, zeros, low-rank factors, over their original weight count), stored MB, compression
seconds and peak RSS of the process so far.

Rows: FP; uniform RTN and GPTQ at 2/3/4 bits g128; GPTQ + bit allocation (no low-rank) at the average
bits that uniform 2- and 3-bit g128 cost; CASP+GPTQ (low-rank Q/K + allocation) at those averages and at
2.0, 2.5, 3.25 and 4.25.

Usage: python benchmarks/real_lm.py [--model smollm2-135m] [--ctx 512] [--calib-samples 64] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from casp.config import CompressionConfig
from casp.models.engine import peak_rss_mb
from casp.eval.text_ppl import text_perplexity
from casp.io.modelio import load_model, load_processor, resolve_model_path, tokenizer_of
from casp.pipeline import compress
from casp.data.textdata import evaluation_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-chars", type=int, default=None, help="evaluate on the first N characters only")
    ap.add_argument("--rows", default="all", help="comma-separated row labels to run (default all)")
    ap.add_argument("--granularity", default="matrix", choices=["matrix", "layer"],
                    help="allocation unit of the rd rows (the table in the README used matrix)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    path = resolve_model_path(args.model)
    tok = tokenizer_of(load_processor(path))
    text = evaluation_text()[: args.eval_chars] if args.eval_chars else evaluation_text()
    common = dict(seed=args.seed, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)

    def ppl(model) -> dict:
        return text_perplexity(model, tok, text, context_length=args.ctx, progress=False)

    rows: list[dict] = []
    cache: dict = {}

    def record(label, model, report, seconds):
        p = ppl(model)
        row = {"method": label, "text_ppl": p["text_ppl"], "tokens": p["tokens"], "context_length": p["context_length"],
               "average_bits": report["average_bits"] if report else 16.0,
               "stored_mb": (report["stored_bytes"] if report else fp_bytes) / 1e6,
               "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
        rows.append(row)
        print(f"| {label} | {row['average_bits']:.3f} | {row['text_ppl']:.2f} | {row['stored_mb']:.2f} | "
              f"{seconds:.0f} | {row['peak_rss_mb']:.0f} |", flush=True)
        return row

    def run(label, **cfg):
        if args.rows != "all" and label not in args.rows.split(","):
            return None
        t = time.time()
        res = compress(path, None, CompressionConfig(**common, **cfg), progress=False, cache=cache)
        return record(label, res.model, res.report, time.time() - t)

    fp_model = load_model(path)
    fp_bytes = 2 * sum(p.numel() for n, p in fp_model.named_parameters() if ".layers." in n and n.endswith("proj.weight"))
    print(f"model {args.model}; token perplexity over non-overlapping {args.ctx}-token windows of the built-in "
          f"evaluation text; calibration {args.calib_samples} x {args.calib_seq_len} tokens of the built-in calibration text\n")
    print("| method | average bits | token ppl | stored MB | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    record("FP", fp_model, None, 0.0)
    del fp_model
    uniform = {}
    for q in ("rtn", "gptq"):
        for b in (2, 3, 4):
            r = run(f"{q.upper()} {b}-bit g128", quantizer=q, bits=b, allocation="uniform", qk_rank=0)
            if r:
                uniform[(q, b)] = r["average_bits"]
    for b in (2, 3):
        avg = uniform.get(("gptq", b), b + 0.14)
        run(f"GPTQ + allocation @ {avg:.3f}", quantizer="gptq", bits=avg, allocation="rd", qk_rank=0,
            granularity=args.granularity)
        run(f"CASP+GPTQ @ {avg:.3f}", quantizer="gptq", bits=avg, allocation="rd", qk_rank=0.25,
            granularity=args.granularity)
    for target in (2.0, 2.5, 3.25, 4.25):
        run(f"CASP+GPTQ @ {target}", quantizer="gptq", bits=target, allocation="rd", qk_rank=0.25,
            granularity=args.granularity)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
