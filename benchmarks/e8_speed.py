"""What CASP+E8 costs next to plain GPTQ, side by side in one run, at the defaults a user gets.

Rows (each in its own process, `--threads` torch threads unless the row says otherwise, calibration
`--calib-samples` x `--calib-seq-len` of casp's built-in text): uniform GPTQ 3-bit (`--allocation uniform
--bits 3`), CASP+E8 at 3.25 (`--quantizer e8 --incoherence --bits 3.25`), the same with one thread, uniform
E8 2-bit and uniform GPTQ 2-bit. Each row: measured average bits, token perplexity on casp's built-in
evaluation text, KL vs FP, compression seconds, peak RSS; then the ratios the speed targets are stated in.

Usage: python benchmarks/e8_speed.py [--model smollm2-135m] [--threads 2] [--calib-samples 128]
                                     [--rows LABEL,...] [--layers 0,1,2]
`--layers` compresses only those decoder layers (a quick check of the ratios; the others stay dense).
"""
from __future__ import annotations

import json
import subprocess
import sys

from vector_quant import _drop_values, arguments, run_row

ROWS = [
    {"label": "GPTQ 3-bit", "quantizer": "gptq", "bits": 3, "allocation": "uniform", "qk_rank": 0},
    {"label": "CASP+E8 @ 3.25", "quantizer": "e8", "bits": 3.25, "allocation": "rd", "qk_rank": "joint",
     "transform": "incoherence"},
    {"label": "CASP+E8 @ 3.25, 1 thread", "quantizer": "e8", "bits": 3.25, "allocation": "rd", "qk_rank": "joint",
     "transform": "incoherence", "threads": 1},
    {"label": "E8 2-bit", "quantizer": "e8", "bits": 2, "allocation": "uniform", "qk_rank": 0,
     "transform": "incoherence"},
    {"label": "GPTQ 2-bit", "quantizer": "gptq", "bits": 2, "allocation": "uniform", "qk_rank": 0},
]


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--layers", help="compress only these decoder layers (comma-separated)")
    ap.set_defaults(calib_samples=128, threads=2)
    args = ap.parse_args()
    args.script = __file__
    if args.one_row:
        spec = json.loads(args.one_row)
        args.threads = spec.get("threads", args.threads)
        print(json.dumps(run_row(spec, args)))
        return
    specs = [s for s in ROWS if args.rows == "all" or s["label"] in args.rows.split(",")]
    if args.layers:
        for s in specs:
            s["layers"] = [int(i) for i in args.layers.split(",")]
    print(f"model {args.model}; calibration {args.calib_samples} x {args.calib_seq_len}; {args.threads} threads"
          f"{'; layers ' + args.layers if args.layers else ''}\n")
    print("| method | average bits | token ppl | KL vs FP | compress s | peak RSS MB |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = {}
    for spec in specs:
        forwarded = _drop_values(sys.argv[1:], ("--rows", "--json", "--layers"))
        out = subprocess.run([sys.executable, __file__, *forwarded, "--one-row", json.dumps(spec)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {spec['label']} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[spec["label"]] = r
        print(f"| {r['method']} | {r['average_bits']:.3f} | {r['text_ppl']:.2f} | {r['kl']:.4f} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |", flush=True)
    ratios = [("CASP+E8 @ 3.25 / GPTQ 3-bit (target <= 2)", "CASP+E8 @ 3.25", "GPTQ 3-bit"),
              ("E8 2-bit / GPTQ 2-bit (target <= 1.5)", "E8 2-bit", "GPTQ 2-bit"),
              ("1 thread / 2 threads, CASP+E8 (target >= 1.6)", "CASP+E8 @ 3.25, 1 thread", "CASP+E8 @ 3.25")]
    print()
    for text, a, b in ratios:
        if a in rows and b in rows:
            print(f"{text}: {rows[a]['seconds'] / rows[b]['seconds']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(rows.values()), f, indent=2)


if __name__ == "__main__":
    main()
