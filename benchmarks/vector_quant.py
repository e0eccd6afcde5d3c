"""Scalar vs vector quantizers at 2-4 bits, side by side in one run, at measured honest bits.

Rows: FP; uniform RTN, GPTQ, GPTQ + incoherence and the E8 lattice quantizer (with incoherence) at 2, 3
and 4 bits; CASP + E8 (Q/K ranks and bits chosen jointly + incoherence) at 2.0, 2.5, 3.25 and 4.25; and, where the
quantizer is registered, AQLM rows (uniform 2-bit without and with layer-output fine-tuning, CASP + AQLM at
2.0 and 2.5 with it; on the embedded model 2 x 4-bit codebooks of 4-vectors). Each row runs in its own process (so its peak RSS is its own) with one
torch thread, and reports: measured average bits (every stored bit: codes, scales, zeros, codebooks,
sign vectors, factors), token perplexity (SmolLM2) or KL vs FP and VQA accuracy (embedded VLM),
compression seconds, peak RSS, and the CPU time of a batch-1 forward pass next to the dense model's.

Usage: python benchmarks/vector_quant.py [--model smollm2-135m|embedded] [--rows LABEL,...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


AQLM_FINETUNE_STEPS = {"embedded": 50}   # --finetune-steps of the tuned AQLM rows (25 on SmolLM2: time)


def row_specs(model: str) -> list[dict]:
    rows = [{"label": "FP"}]
    for q, name, transform in (("rtn", "RTN", None), ("gptq", "GPTQ", None), ("gptq", "GPTQ + incoherence", "incoherence"),
                               ("e8", "E8 + incoherence", "incoherence")):
        for b in (2, 3, 4):
            rows.append({"label": f"{name} {b}-bit", "quantizer": q, "bits": b, "allocation": "uniform", "qk_rank": 0,
                         "transform": transform})
    for target in (2.0, 2.5, 3.25, 4.25):
        rows.append({"label": f"CASP+E8 @ {target}", "quantizer": "e8", "bits": target, "allocation": "rd",
                     "qk_rank": "joint", "transform": "incoherence"})
    small = {"codebook_bits": 4, "group_size": 4} if model == "embedded" else {}   # 2x8g8 codebooks outweigh tiny matrices
    steps = AQLM_FINETUNE_STEPS.get(model, 25)
    rows.append({"label": "AQLM 2-bit", "quantizer": "aqlm", "bits": 2, "allocation": "uniform", "qk_rank": 0,
                 "options": small})
    rows.append({"label": f"AQLM 2-bit + {steps} fine-tune steps", "quantizer": "aqlm", "bits": 2,
                 "allocation": "uniform", "qk_rank": 0, "options": small, "finetune_steps": steps})
    # rd measures every matrix at every candidate: on SmolLM2 only 2 and 3 bits, 2 rounds (time on 1 thread)
    rd_options = small if model == "embedded" else {**small, "candidate_bits": [2, 3], "rounds": 2}
    for target in (2.0, 2.5):
        rows.append({"label": f"CASP+AQLM @ {target}", "quantizer": "aqlm", "bits": target, "allocation": "rd",
                     "qk_rank": "joint", "options": rd_options, "finetune_steps": steps})
    return rows


def _forward_seconds(model, ids, repeats: int = 3) -> float:
    import torch

    with torch.no_grad():
        model(ids)
        t = time.perf_counter()
        for _ in range(repeats):
            model(ids)
    return (time.perf_counter() - t) / repeats


def text_kl(reference, model, tokenizer, text: str, ctx: int, windows: int) -> float:
    """Mean KL(FP ‖ model) of next-token distributions over the first `windows` windows of `ctx` tokens."""
    import torch
    import torch.nn.functional as F

    from casp.eval.text_ppl import tokenize_text

    ids = tokenize_text(tokenizer, text)[: ctx * windows].view(-1, ctx)
    total = 0.0
    with torch.no_grad():
        for row in ids:
            p = F.log_softmax(reference(row[None]).logits.float(), -1)
            q = F.log_softmax(model(row[None]).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(ids)


def run_row(spec: dict, args, cache: dict | None = None) -> dict:
    """One row in this process: compress (unless FP), evaluate, time a batch-1 forward.

    `cache` (with --shared-plan) lets rows that differ only in target bits share one measured plan.
    """
    import torch

    torch.set_num_threads(args.threads)
    from casp.config import CompressionConfig
    from casp.io.modelio import load_model, load_processor, resolve_model_path, tokenizer_of
    from casp.models.engine import peak_rss_mb
    from casp.pipeline import compress
    from casp.run import RunOptions

    path = resolve_model_path(None if args.model == "embedded" else args.model)
    processor = load_processor(path)
    reference = load_model(path)
    t0 = time.time()
    report = None
    model = reference
    if spec["label"] != "FP":
        cfg = CompressionConfig(bits=spec["bits"], quantizer=spec["quantizer"], allocation=spec["allocation"],
                                qk_rank=spec["qk_rank"], transform=spec.get("transform"), seed=args.seed,
                                quantizer_options=spec.get("options", {}), search_steps=spec.get("search_steps", 0),
                                **tuning_of(spec),
                                calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                layers=tuple(spec["layers"]) if spec.get("layers") else None)
        res = compress(load_model(path), None, cfg, processor=processor, progress=False, options=RunOptions(cache=cache))
        model, report = res.model, res.report
    seconds = time.time() - t0
    row = {"method": spec["label"], "average_bits": report["average_bits"] if report else 16.0,
           "seconds": seconds if report else 0.0,
           "baseline_check": (report or {}).get("baseline_check"),
           "phase_seconds": (report or {}).get("phase_seconds"), "finetune": (report or {}).get("finetune"),
           "e2e": (report or {}).get("e2e")}
    if args.model == "embedded":
        from casp.eval.evaluate import embedded_eval_records, evaluate_vlm

        vqa, _ = embedded_eval_records()
        vqa = vqa[: args.questions]
        r = evaluate_vlm(model, processor, reference=reference, vqa_records=vqa, kl_records=vqa[: args.kl_records],
                         progress=False)
        row.update(vqa_accuracy=r["vqa_accuracy"], kl=r["kl_vs_reference"])
    else:
        from casp.data.textdata import evaluation_texts
        from casp.eval.text_ppl import text_perplexity

        tok = tokenizer_of(processor)
        for i, name in enumerate(args.eval_texts.split(",")):
            text = evaluation_texts()[name]
            text = text[: args.eval_chars] if args.eval_chars else text
            ppl = text_perplexity(model, tok, text, context_length=args.ctx, progress=False)["text_ppl"]
            row["text_ppl" if i == 0 else f"text_ppl_{name}"] = ppl
            if i == 0:
                row["kl"] = text_kl(reference, model, tok, text, args.ctx, args.kl_windows) if report else 0.0
    from casp.data.textdata import evaluation_text
    from casp.eval.text_ppl import tokenize_text

    ids = tokenize_text(tokenizer_of(processor), evaluation_text()[:4000])[: args.forward_tokens][None]
    row["forward_s"] = _forward_seconds(model, ids)
    row["dense_forward_s"] = _forward_seconds(reference, ids)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def arguments(description: str) -> argparse.ArgumentParser:
    """The options shared by the benchmarks that run rows through `run_row`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m", help="a text model or built-in name (token ppl) or embedded "
                    "(KL, VQA)")
    ap.add_argument("--rows", default="all", help="comma-separated row labels (default: all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--eval-chars", type=int, default=60000, help="evaluate on the first N characters (0: all)")
    ap.add_argument("--eval-texts", default="alice", help="shipped evaluation texts (alice, licences); KL on the first")
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--kl-records", type=int, default=200)
    ap.add_argument("--kl-windows", type=int, default=8, help="text windows for KL vs FP (SmolLM2)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--forward-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    add_shared_plan(ap)
    ap.add_argument("--one-row", help=argparse.SUPPRESS)
    return ap


def add_shared_plan(ap: argparse.ArgumentParser) -> None:
    """--shared-plan, the option every row-table benchmark reads through `rows_in_own_processes`."""
    ap.add_argument("--shared-plan", action="store_true",
                    help="run every row in this process, rows that differ only in target bits sharing one measured "
                         "plan where their candidate settings are the same (targets with the same whole bits): a "
                         "row's seconds then exclude a plan measured for an earlier row, and peak RSS is the "
                         "process's running maximum")


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    args.script = __file__
    if args.one_row:
        print(json.dumps(run_row(json.loads(args.one_row), args)))
        return
    run_table(row_specs(args.model), args)


def run_table(all_specs: list[dict], args) -> list[dict]:
    """Run the selected rows, each in its own process (with --shared-plan all in this one), printing the table
    as rows finish."""
    from casp.quant.base import available_quantizers

    known = set(available_quantizers())
    specs = [s for s in all_specs if s.get("quantizer", "rtn") in known]
    if args.rows != "all":
        specs = [s for s in specs if s["label"] in args.rows.split(",")]
    metric = "KL vs FP | VQA acc" if args.model == "embedded" else "token ppl | KL vs FP"
    print(f"model {args.model}; calibration {args.calib_samples} x {args.calib_seq_len}; {args.threads} torch thread(s)\n")
    print(f"| method | average bits | {metric} | compress s | peak RSS MB | forward ms (dense ms) |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def show(r):
        value = f"{r['kl']:.5f} | {r['vqa_accuracy']:.4f}" if args.model == "embedded" else \
            f"{r['text_ppl']:.2f} | {r['kl']:.4f}"
        print(f"| {r['method']} | {r['average_bits']:.3f} | {value} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{1000 * r['forward_s']:.1f} ({1000 * r['dense_forward_s']:.1f}) |", flush=True)

    in_process = (lambda spec, cache: run_row(spec, args, cache)) if args.shared_plan else None
    rows = rows_in_own_processes(args.script, specs, show, in_process)
    write_rows(args.json, rows)
    return rows


def tuning_of(spec: dict) -> dict:
    """The fine-tuning options a row spec gives (`CompressionConfig` keywords); the others keep their defaults."""
    from casp.recipe import TUNING

    return {k: spec[k] for k in TUNING if k in spec}


def rows_in_own_processes(script: str, specs: list[dict], show, in_process=None) -> list[dict]:
    """Each spec's row in its own process (this command's flags less --rows and --json), in order; `show(row)`
    prints a finished row, a failed or refused one is printed as such. The finished rows.

    `in_process(spec, cache)` (given with --shared-plan) runs the rows in this process instead, rows that
    differ only in target bits or tuning sharing one measured plan."""
    argv = _drop_values(sys.argv[1:], ("--rows", "--json"))
    done, cache = [], {}
    for spec in specs:
        if in_process:
            r, status = _in_process(in_process, spec, cache)
        else:
            r, error = row_in_own_process(script, argv, spec)
            status = f"failed: {error}"
        if r is None:
            print(f"| {spec['label']} | {status} |", flush=True)
            continue
        done.append(r)
        show(r)
    return done


def write_rows(path: str | None, rows: list[dict]) -> None:
    """The rows as JSON to `path` (--json), when given."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


def row_in_own_process(script: str, argv: list[str], spec: dict) -> tuple[dict | None, str]:
    """Run one row as `script ARGV --one-row SPEC` in a new process: (its row, "") or (None, its last error line)."""
    out = subprocess.run([sys.executable, script, *argv, "--one-row", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else str(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def _in_process(run, spec: dict, cache: dict) -> tuple[dict | None, str]:
    """`run(spec, cache)` in this process: (its row, "") or (None, "refused: " and casp's one-line error)."""
    from casp.errors import CaspError

    try:
        return run(spec, cache), ""
    except CaspError as e:   # e.g. a target below what dense Q/K can reach
        return None, f"refused: {e}"


def _drop_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (either `--flag v` or `--flag=v`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
