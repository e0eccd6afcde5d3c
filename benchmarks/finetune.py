"""Fine-tuning after quantization, measured: no tuning, block-wise only, block-wise plus end to end.

For each quantizer under CASP (E8 with incoherence, GPTQ, AQLM; `--quantizers`; `e8s` is E8 under
`--transform incoherence-scaled`, whose sides are tuned too) at each target
(`--targets`, default 2.0, 2.5, 3.25 bits), four rows side by side: without fine-tuning,
`--finetune-steps` (each layer's continuous stored parameters tuned to its original output),
`--e2e-steps` alone (the whole model distilled into the original's next-token distribution), and both. Each row runs in its own process with `--threads` torch threads and shows measured
average bits, the model's metric (token perplexity on two evaluation texts and KL for a text LM; KL and
VQA accuracy for `embedded`; accuracy per question type and KL for `fashion-vlm`), compression seconds
(the tuning's share in brackets) and peak RSS.

Usage: python benchmarks/finetune.py [--model smollm2-135m|embedded|fashion-vlm] [--targets 2.0,2.5,3.25]
       [--quantizers e8,gptq,aqlm] [--block-steps 50] [--e2e-steps 128] [--block-lr 1e-2] [--e2e-lr 1e-2] [--calib-samples 128]
       [--layers 0,1,2] [--uniform] [--within] [--rows LABEL,...] [--json FILE]
`--layers` compresses only those decoder layers (a quick comparison; the others stay dense); `--uniform`
runs uniform settings instead of CASP; `--within` adds `--finetune-within-layer` to the block-wise rows.
"""
from __future__ import annotations

import json

from vector_quant import arguments, rows_in_own_processes, write_rows

QUANTIZERS = {"e8": {"quantizer": "e8", "transform": "incoherence"},
              "e8s": {"quantizer": "e8", "transform": "incoherence-scaled"},
              "gptq": {"quantizer": "gptq"}, "aqlm": {"quantizer": "aqlm"}}


def row_specs(args) -> list[dict]:
    rows = [{"label": "FP"}]
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    for q in args.quantizers.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            if args.uniform:
                base = {**QUANTIZERS[q], "bits": target, "allocation": "uniform", "qk_rank": 0, "layers": layers}
                name = f"{q.upper()} {target:g}-bit"
            else:
                base = {**QUANTIZERS[q], "bits": target, "allocation": "rd", "qk_rank": "joint", "layers": layers}
                name = f"CASP+{q.upper()} @ {target}"
            rows.append({**base, "label": name})
            block = {"finetune_steps": args.block_steps, "finetune_within": args.within, "finetune_lr": args.block_lr}
            e2e = {"e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr}
            rows.append({**base, "label": f"{name} + block {args.block_steps}", **block})
            rows.append({**base, "label": f"{name} + e2e {args.e2e_steps}", **e2e})
            rows.append({**base, "label": f"{name} + block {args.block_steps} + e2e {args.e2e_steps}",
                         **block, **e2e})
    return rows


def run_row(spec: dict, args, cache: dict | None = None) -> dict:
    if args.model == "fashion-vlm":
        import real_vlm

        return real_vlm.run_row(spec, args, cache)
    import vector_quant

    return vector_quant.run_row(spec, args, cache)


def _tuning_seconds(r: dict) -> float:
    ft, e2e = r.get("finetune") or {}, r.get("e2e") or {}
    return ft.get("seconds", 0.0) + e2e.get("seconds", 0.0)


def _metric(r: dict, model: str) -> str:
    if model == "fashion-vlm":
        from casp.data import fashion_scenes

        per = r["per_type"]
        return f"{r['accuracy']:.3f} ({' / '.join(f'{per.get(t, 0):.2f}' for t in fashion_scenes.TYPES)})"
    if model == "embedded":
        return f"{r['vqa_accuracy']:.4f}"
    second = [v for k, v in r.items() if k.startswith("text_ppl_")]
    return f"{r['text_ppl']:.2f} | " + (f"{second[0]:.2f}" if second else "-")


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--targets", default="2.0,2.5,3.25")
    ap.add_argument("--quantizers", default="e8,gptq,aqlm")
    ap.add_argument("--block-steps", type=int, default=50)
    ap.add_argument("--e2e-steps", type=int, default=128)
    ap.add_argument("--block-lr", type=float, default=1e-2, help="--finetune-lr of the block-wise rows")
    ap.add_argument("--e2e-lr", type=float, default=1e-2, help="--e2e-lr of the end-to-end rows")
    ap.add_argument("--layers", help="compress only these decoder layers (comma-separated)")
    ap.add_argument("--uniform", action="store_true", help="uniform settings at whole-bit targets, no low-rank Q/K "
                    "(rows named 'E8 2-bit' ...) instead of CASP")
    ap.add_argument("--within", action="store_true", help="the block-wise rows also tune within each layer "
                    "(--finetune-within-layer)")
    ap.set_defaults(calib_samples=128, eval_texts="alice,licences", kl_records=300)
    args = ap.parse_args()
    args.script = __file__
    if args.one_row:
        print(json.dumps(run_row(json.loads(args.one_row), args)))
        return
    specs = row_specs(args)
    if args.rows != "all":
        specs = [s for s in specs if s["label"] in args.rows.split(",")]
    texts = args.eval_texts.split(",")
    metric = {"fashion-vlm": "accuracy (position / presence / where)", "embedded": "VQA accuracy"}.get(
        args.model, " | ".join(f"token ppl {t}" for t in (texts[0], texts[-1] if len(texts) > 1 else "-")))
    print(f"model {args.model}; calibration {args.calib_samples} samples; {args.threads} torch thread(s)"
          f"{'; layers ' + args.layers if args.layers else ''}\n")
    print(f"| method | average bits | {metric} | KL vs FP | compress s (tuning s) | peak RSS MB |")
    print("|---|---|---|---|---|---|" + ("---|" if "|" in metric else ""), flush=True)

    def show(r):
        print(f"| {r['method']} | {r['average_bits']:.3f} | {_metric(r, args.model)} | {r['kl']:.4f} | "
              f"{r['seconds']:.0f} ({_tuning_seconds(r):.0f}) | {r['peak_rss_mb']:.0f} |", flush=True)

    in_process = (lambda spec, cache: run_row(spec, args, cache)) if args.shared_plan else None
    write_rows(args.json, rows_in_own_processes(__file__, specs, show, in_process))


if __name__ == "__main__":
    main()
