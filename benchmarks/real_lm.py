"""CASP against its own baselines on real pretrained LMs, at measured honest bits, one table per model.

For each model in --models (built-in names, directories, or `embedded` for the embedded VLM's VQA accuracy and
answer KL; default smollm2-135m and gemma3-270m) and each
quantizer in --quantizers (gptq, e8), at every target in --targets (default 2.5, 3.25, 4.25):
- uniform: the quantizer's uniform setting at ⌊target⌋ bits (GPTQ g128; E8 with incoherence);
- allocation alone: rd bit allocation, Q/K dense (`--qk-rank 0`);
- CASP joint: Q/K ranks and bits chosen together (`--qk-rank joint`, the default).
Each row runs in its own process (its own peak RSS), one torch thread, calibration 128 × 512 tokens of casp's
built-in Python documentation, and reports measured average bits (every stored bit), token perplexity on
both shipped held-out texts (the novel and the licences, first --eval-chars characters each, ctx 512),
KL(FP ‖ model) on the novel's first windows, compression seconds (the baseline check included) and what the
baseline check kept.

Usage: python benchmarks/real_lm.py [--models smollm2-135m,gemma3-270m] [--quantizers gptq,e8]
       [--targets 2.5,3.25,4.25] [--search-steps 0] [--rows LABEL,...] [--shared-plan] [--json FILE]
--shared-plan runs the rows in this process, rows that differ only in target sharing one measured plan (their
seconds then leave out the measuring).
"""
from __future__ import annotations

import json
import math
import sys

from vector_quant import _drop_values, arguments, row_in_own_process, run_row, write_rows

TRANSFORM = {"gptq": None, "e8": "incoherence"}


def specs(targets: list[float], quantizers: list[str], search_steps: int) -> list[dict]:
    rows = [{"label": "FP"}]
    for q in quantizers:
        name, transform, uniform_done = q.upper(), TRANSFORM.get(q), set()
        base = {"quantizer": q, "transform": transform}
        for t in targets:
            b = min(max(math.floor(t), 2), 4)
            if b not in uniform_done:
                uniform_done.add(b)
                rows.append({**base, "label": f"{name} uniform {b}-bit", "bits": b, "allocation": "uniform",
                             "qk_rank": 0})
            rows.append({**base, "label": f"{name} allocation alone @ {t}", "bits": t, "allocation": "rd",
                         "qk_rank": 0})
            rows.append({**base, "label": f"{name} CASP joint @ {t}", "bits": t, "allocation": "rd",
                         "qk_rank": "joint", "search_steps": search_steps})
    return rows


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--quantizers", default="gptq,e8")
    ap.add_argument("--targets", default="2.5,3.25,4.25")
    ap.add_argument("--search-steps", type=int, default=0)
    ap.set_defaults(calib_samples=128, eval_texts="alice,licences")
    args = ap.parse_args()
    if args.one_row:
        print(json.dumps(run_row(json.loads(args.one_row), args)))
        return
    targets = [float(t) for t in args.targets.split(",")]
    rows = specs(targets, args.quantizers.split(","), args.search_steps)
    if args.rows != "all":
        rows = [r for r in rows if r["label"] in args.rows.split(",")]
    done = {}
    for model in args.models.split(","):
        done[model] = table(model, rows, args)
    write_rows(args.json, done)


def table(model: str, rows: list[dict], args) -> list[dict]:
    """One model's table, each row in its own process, printed as rows finish."""
    texts = ["VQA accuracy"] if model == "embedded" else args.eval_texts.split(",")
    if model == "embedded":
        print(f"\nmodel embedded; calibration {args.calib_samples} training scenes; {args.threads} torch thread(s); "
              f"exact match on {args.questions} test questions, KL on the answers of the first {args.kl_records}\n")
        print("| method | average bits | VQA accuracy | KL vs FP | compress s | baseline check kept |")
    else:
        print(f"\nmodel {model}; calibration {args.calib_samples} x {args.calib_seq_len} (built-in Python docs); "
              f"{args.threads} torch thread(s); ppl on the first {args.eval_chars} characters, ctx {args.ctx}\n")
        print(f"| method | average bits | {' | '.join(f'ppl {t}' for t in texts)} | KL vs FP ({texts[0]}) | "
              "compress s | baseline check kept |")
    print("|---|---|" + "---|" * len(texts) + "---|---|---|", flush=True)
    argv = _drop_values(sys.argv[1:], ("--rows", "--json", "--models"))
    out_rows, cache = [], {}
    for spec in rows:
        if args.shared_plan:   # in this process, rows that differ only in target bits share one measured plan
            args.model = model
            out_rows.append(r := run_row(spec, args, cache))
            _print_row(r, texts)
            continue
        r, error = row_in_own_process(__file__, [*argv, "--model", model], spec)
        if r is None:
            print(f"| {spec['label']} | failed: {error} |", flush=True)
            continue
        out_rows.append(r)
        _print_row(r, texts)
    return out_rows


def _print_row(r: dict, texts: list[str]) -> None:
    ppls = [r["vqa_accuracy"]] if "vqa_accuracy" in r else [r["text_ppl"]] + [r[f"text_ppl_{t}"] for t in texts[1:]]
    check = r.get("baseline_check") or {}
    kept = check.get("kept", "–") if "skipped" not in check else "skipped"
    digits = 4 if "vqa_accuracy" in r else 2
    print(f"| {r['method']} | {r['average_bits']:.3f} | {' | '.join(f'{p:.{digits}f}' for p in ppls)} | {r['kl']:.5f} | "
          f"{r['seconds']:.0f} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
