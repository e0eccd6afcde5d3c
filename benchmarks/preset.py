"""Does a preset hold beyond the text it was found on? GPTQ with and without XᵀX's off-diagonal shrink,
calibrated on each of several texts, evaluated on several held-out texts.

The `stand-in-text` preset (`--hessian-shrink 0.5`) was measured on casp's built-in calibration text (Python
documentation) and evaluated on the built-in evaluation text. This benchmark asks the same question for
other calibration sources and other evaluation texts: one table, one row per (calibration text, shrink),
token perplexity on every evaluation text (non-overlapping --ctx windows over the first --eval-chars
characters), measured average bits and seconds. One torch thread.

Usage: python benchmarks/preset.py --calib builtin,/path/other.txt --eval builtin,/path/held_out.txt
       [--model smollm2-135m] [--bits 3] [--allocation uniform] [--shrinks 0,0.5] [--calib-samples 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _text(name: str) -> str:
    from casp.data.textdata import evaluation_text, read_text_file

    return evaluation_text() if name == "builtin" else read_text_file(name)


def _label(name: str) -> str:
    return "built-in" if name == "builtin" else Path(name).name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="builtin", help="comma-separated calibration texts ('builtin': casp's own)")
    ap.add_argument("--eval", default="builtin", help="comma-separated evaluation texts ('builtin': casp's own)")
    ap.add_argument("--shrinks", default="0,0.5")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-chars", type=int, default=30000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from casp.config import CompressionConfig
    from casp.eval.text_ppl import text_perplexity
    from casp.io.modelio import load_model, load_processor, resolve_model_path, tokenizer_of
    from casp.pipeline import compress

    path = resolve_model_path(args.model)
    tokenizer = tokenizer_of(load_processor(path))
    evals = {_label(e): _text(e)[: args.eval_chars] for e in args.eval.split(",")}

    def ppl(model) -> list[float]:
        return [text_perplexity(model, tokenizer, t, context_length=args.ctx, progress=False)["text_ppl"]
                for t in evals.values()]

    print(f"{args.model}, GPTQ {args.allocation} @ {args.bits} bits, {args.calib_samples} x {args.calib_seq_len} "
          f"calibration tokens, ctx {args.ctx}, first {args.eval_chars} characters of each evaluation text\n")
    print("| calibration | shrink | average bits | " + " | ".join(f"ppl {k}" for k in evals) + " | seconds |")
    print("|---|---|---|" + "---|" * len(evals) + "---|")
    fp = ppl(load_model(path))
    print("| FP | – | 16 | " + " | ".join(f"{p:.2f}" for p in fp) + " | – |", flush=True)
    for calib in args.calib.split(","):
        for shrink in (float(s) for s in args.shrinks.split(",")):
            cfg = CompressionConfig(bits=args.bits, allocation=args.allocation, quantizer="gptq", preset="none",
                                    quantizer_options={"shrink": shrink}, calib_samples=args.calib_samples,
                                    calib_seq_len=args.calib_seq_len,
                                    calib_text=None if calib == "builtin" else calib)
            t0 = time.time()
            result = compress(path, None, cfg, progress=False)
            seconds = time.time() - t0
            print(f"| {_label(calib)} | {shrink} | {result.report['average_bits']:.3f} | "
                  + " | ".join(f"{p:.2f}" for p in ppl(result.model)) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
