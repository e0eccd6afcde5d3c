"""Many-row forward pass (prefill, teacher-forced evaluation): a compressed model against its dense original.

    python benchmarks/prefill.py COMPRESSED_DIR [--batch 16] [--seq 512] [--reps 3] [--threads N]

Both models see the same `--batch` x `--seq` tokens of casp's evaluation text; timings are paired (each
round runs both, in alternating order, so a slow-down of a shared machine hits both) and the medians are
printed with their ratio (target for E8: at most 1.2x the dense model's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compressed", help="a directory written by casp compress")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import casp
    from casp.data.textdata import evaluation_text
    from casp.data.textdata import tokenize_text
    from casp.io.modelio import load_processor, tokenizer_of
    from casp.threads import use_threads

    threads = use_threads(args.threads)
    compressed = casp.load(args.compressed)
    source = json.loads((Path(args.compressed) / "report.json").read_text())["source"]
    dense = casp.load(source)
    ids = tokenize_text(tokenizer_of(load_processor(source)), evaluation_text())
    need = args.batch * args.seq
    ids = ids[:need].reshape(args.batch, args.seq)
    times = {"dense": [], "compressed": []}
    models = {"dense": dense, "compressed": compressed}
    with torch.no_grad():
        for name in models:
            models[name](input_ids=ids[:1, :64])
        for r in range(args.reps):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                t = time.perf_counter()
                models[name](input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - t)
    d, c = statistics.median(times["dense"]), statistics.median(times["compressed"])
    print(f"{args.batch} x {args.seq} tokens, {threads} threads: dense {d:.2f} s, compressed {c:.2f} s, "
          f"ratio {c / d:.2f}")


if __name__ == "__main__":
    main()
