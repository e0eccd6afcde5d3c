"""Is CASP monotone in its budget? One run of `casp compress` defaults over a sweep of targets on SmolLM2.

The plan (Fisher, XᵀX, every candidate's measured damage, the joint Q/K options) does not depend on the
target, so it is measured once and shared (the `cache` of `casp.compress`); each target is then allocated
and compressed on its own. Each row: target, measured average bits, token perplexity on casp's evaluation
text (non-overlapping --ctx windows), KL(FP ‖ model) on its first windows, compression seconds. The last
column is the rise of perplexity over the best perplexity of every smaller budget: the issue's bound is 1 %.

Usage: python benchmarks/monotone.py [--targets 2.25,2.5,...,4.25] [--calib-samples 128] [--eval-chars 30000]
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="2.25,2.5,2.75,3.0,3.25,3.5,3.75,4.0,4.25")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-chars", type=int, default=30000, help="characters of the evaluation text (0: all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vector_quant import text_kl

    from casp.config import CompressionConfig
    from casp.data.textdata import evaluation_text
    from casp.eval.text_ppl import text_perplexity
    from casp.io.modelio import load_model, load_processor, resolve_model_path, tokenizer_of
    from casp.pipeline import compress
    from casp.run import RunOptions

    path = resolve_model_path(args.model)
    processor = load_processor(path)
    tok = tokenizer_of(processor)
    text = evaluation_text()[: args.eval_chars] if args.eval_chars else evaluation_text()
    reference = load_model(path)
    fp = text_perplexity(reference, tok, text, context_length=args.ctx, progress=False)["text_ppl"]
    print(f"FP token ppl {fp:.2f} ({args.model}, {len(text):,} characters, ctx {args.ctx})", flush=True)
    print("| target | average bits | token ppl | × FP | KL vs FP | seconds | rise over best smaller budget |")
    print("|---|---|---|---|---|---|---|", flush=True)
    cache, rows, best = {}, [], None
    for target in [float(t) for t in args.targets.split(",")]:
        cfg = CompressionConfig(bits=target, quantizer=args.quantizer, calib_samples=args.calib_samples, seed=args.seed)
        t0 = time.time()
        result = compress(load_model(path), None, cfg, processor=processor, progress=False, options=RunOptions(cache=cache))
        seconds = time.time() - t0
        ppl = text_perplexity(result.model, tok, text, context_length=args.ctx, progress=False)["text_ppl"]
        kl = text_kl(reference, result.model, tok, text, args.ctx, args.kl_windows)
        rise = None if best is None else ppl / best - 1
        best = ppl if best is None else min(best, ppl)
        row = {"target": target, "average_bits": result.report["average_bits"], "text_ppl": ppl, "kl": kl,
               "seconds": seconds, "rise": rise}
        rows.append(row)
        print(f"| {target} | {row['average_bits']:.3f} | {ppl:.2f} | {ppl / fp:.2f} | {kl:.4f} | {seconds:.0f} | "
              f"{'–' if rise is None else f'{100 * rise:+.2f} %'} |", flush=True)
    worst = max((r["rise"] for r in rows if r["rise"] is not None), default=0.0)
    print(f"largest rise over a smaller budget's best: {100 * worst:+.2f} % "
          f"({'within' if worst <= 0.01 else 'above'} the 1 % bound)")
    if args.json:
        print(json.dumps({"fp_ppl": fp, "rows": rows}))


if __name__ == "__main__":
    main()
