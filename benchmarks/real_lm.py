"""CASP against its own baselines on a real pretrained LM (smollm2-135m), at measured honest bits.

One table from one run, each row in its own process (its own peak RSS), one torch thread. At every target
in --targets: uniform GPTQ (the nearest uniform setting at or below the target, g128), GPTQ + bit allocation
(no low-rank Q/K), and CASP joint (Q/K ranks and bits chosen together, `--qk-rank joint`), optionally with
the KL-guided search (--search-steps). With --vector, the E8 lattice rows of benchmarks/vector_quant.py too.
Each row: measured average bits (every stored bit of the compressed decoder linears), token perplexity on
casp's built-in evaluation text (non-overlapping --ctx windows), KL(FP ‖ model) on its first windows,
compression seconds, peak RSS and the CPU time of a batch-1 forward next to the dense model's.

Usage: python benchmarks/real_lm.py [--targets 2.0,2.5,3.0,3.25,4.25] [--search-steps 0] [--vector] [--rows ...]
"""
from __future__ import annotations

import math

from vector_quant import arguments, row_specs, run_row, run_table


def specs(targets: list[float], search_steps: int, vector: bool, model: str) -> list[dict]:
    rows, uniform_done = [{"label": "FP"}], set()
    for t in targets:
        b = min(max(math.floor(t), 2), 4)
        if b not in uniform_done:
            uniform_done.add(b)
            rows.append({"label": f"GPTQ {b}-bit g128", "quantizer": "gptq", "bits": b, "allocation": "uniform",
                         "qk_rank": 0})
        rows.append({"label": f"GPTQ + allocation @ {t}", "quantizer": "gptq", "bits": t, "allocation": "rd",
                     "qk_rank": 0})
        rows.append({"label": f"CASP joint @ {t}", "quantizer": "gptq", "bits": t, "allocation": "rd",
                     "qk_rank": "joint"})
        if search_steps:
            rows.append({"label": f"CASP joint + search @ {t}", "quantizer": "gptq", "bits": t, "allocation": "rd",
                         "qk_rank": "joint", "search_steps": search_steps})
    if vector:
        rows += [r for r in row_specs(model) if r["label"] != "FP"]
    return rows


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--targets", default="2.0,2.5,3.0,3.25,4.25")
    ap.add_argument("--search-steps", type=int, default=0)
    ap.add_argument("--vector", action="store_true", help="add the vector-quantizer rows (E8, AQLM)")
    args = ap.parse_args()
    args.script = __file__
    if args.one_row:
        import json

        print(json.dumps(run_row(json.loads(args.one_row), args)))
        return
    targets = [float(t) for t in args.targets.split(",")]
    run_table(specs(targets, args.search_steps, args.vector, args.model), args)


if __name__ == "__main__":
    main()
