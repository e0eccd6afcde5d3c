"""Streamed compression of a 7B-shaped LLaVA on CPU: measured seconds and peak RSS, projected to 70B.

    python benchmarks/scale.py [--model DIR] [--layers 0,1] [--bits 2] [--allocation uniform]
                               [--calib-samples 4] [--calib-seq-len 128] [--threads 1] [--gpu-tflops 20]
                               [--device cuda] [--lm-layers N] [--calib-jsonl FILE] [casp compress flags]

`--model` is a checkpoint written by `scripts/make_shaped_model.py` (LLaVA-1.5-7B shapes, random fp16
weights); it is written first when the directory does not exist. One `casp compress --stream` run
compresses the `--layers` subset (the other decoder layers are streamed through: read, run, written
as fp16) and prints, from its report: seconds of each compressed layer, the whole run's wall time and
peak RSS. The run is one process, so peak RSS is this compression's alone.

Projections to the 7B, 13B, 34B and 70B language models (the same CLIP tower in front of each):
- RSS: peak = base + max(non-layer parts, one layer's working set), all float32 in memory. A layer's
  working set = its weights (4 B each) + XᵀX of its four input groups (float64: 8·(3h² + i²) with h
  the hidden and i the MLP size) + GPTQ's largest Hessian work (k·8·i²). `base` is measured (RSS of
  the process before any weights) and k is fitted so that the formula gives the measured 7B peak.
- Time: GPTQ's FLOPs per layer Σ over linears (2·out·in² + in³) + XᵀX (2·tokens·in² per group) +
  the layer's forward (2·tokens·params), divided by the rate measured on the compressed 7B layers;
  plus the measured per-layer streaming overhead scaled by the layer's parameters. The GPU column is
  an assumption, printed as such (no GPU was measured): the same FLOPs at `--gpu-tflops`, plus
  `--gpu-column-us` per GPTQ column (its column loop is sequential: a few small kernels per column).

Any other flag goes to `casp compress` as it is (for example `--quantizer e8 --incoherence`). A run whose
passes are not GPTQ's single one (rate-distortion allocation, the E8 lattice) is projected by layers
instead: `--lm-layers N` writes (or reuses) a shaped checkpoint whose language model has only N layers of
the real shapes, every one of them compressed, so that every pass of the run (sensitivity forward and
backward, analysis, layer pass) is measured over whole 7B-shaped layers. The 32-layer time is then
load_and_calibrate + catches + (plan_and_allocate + compress_layers − catches) × 32 / N. A catch is one
run of the parts before decoder layer 0 (vision tower, projector, embeddings) over the calibration samples,
which every pass pays once whatever the number of layers. The layer pass's catch is its time outside its
layers (`compress_layers` less the layers' own seconds, which also holds the writing of each layer); the
sensitivity and analysis passes of the plan catch only their first tokens (the recipe's `fisher_tokens`, and
16,384), so each is taken as that share of it. The projection still counts the LM head of the sensitivity pass once per layer: a slight
over-estimate. `--calib-jsonl` (image + question + answer records) calibrates on images through the
model's own processor.
`--device cuda` runs the same compression with each layer's work on the GPU (docs/gpu.md) and prints its
peak device memory: the measured GPU row, once a GPU is lent (none has been yet).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VISION_PARAMS = 303_507_456 + 21_000_000   # CLIP ViT-L/14-336 tower + 2-layer projector (LLaVA-1.5)
SHAPES = {  # language model: hidden, MLP, layers, heads, kv heads, vocabulary
    "7B": (4096, 11008, 32, 32, 32, 32064),
    "13B": (5120, 13824, 40, 40, 40, 32064),
    "34B": (7168, 20480, 60, 56, 8, 64000),
    "70B": (8192, 28672, 80, 64, 8, 32064),
}


def layer_linears(hidden: int, mlp: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """(out, in) of the seven linears of one Llama decoder layer."""
    kv = hidden * kv_heads // heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
            (hidden, mlp)]


def layer_params(shape) -> int:
    hidden, mlp, _, heads, kv_heads, _ = shape
    return sum(o * i for o, i in layer_linears(hidden, mlp, heads, kv_heads)) + 2 * hidden


def layer_flops(shape, tokens: int) -> float:
    hidden, mlp, _, heads, kv_heads, _ = shape
    gptq = sum(2 * o * i * i + i ** 3 for o, i in layer_linears(hidden, mlp, heads, kv_heads))
    moments = 2 * tokens * (3 * hidden ** 2 + mlp ** 2)
    return gptq + moments + 2 * tokens * layer_params(shape)


def layer_columns(shape) -> int:
    hidden, mlp, _, heads, kv_heads, _ = shape
    return sum(i for _, i in layer_linears(hidden, mlp, heads, kv_heads))


def rest_params(shape) -> int:
    hidden, _, _, _, _, vocab = shape
    return VISION_PARAMS + 2 * vocab * hidden + hidden


def working_set(shape, k: float) -> float:
    hidden, mlp = shape[0], shape[1]
    return 4 * layer_params(shape) + 8 * (3 * hidden ** 2 + mlp ** 2) + k * 8 * mlp ** 2


def base_rss_bytes() -> float:
    """RSS of a process that has imported casp, torch and transformers, before any weights."""
    code = ("import resource, casp.pipeline, transformers; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()) * 1024


def run(args) -> dict:
    model = Path(args.model)
    if not model.exists():
        extra = ["--layers", str(args.lm_layers)] if args.lm_layers else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shaped_model.py"), str(model), *extra],
                       check=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="casp-scale-")) / "compressed"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.reuse and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        return {"report": report, "wall": report["seconds"], "out": out}
    cmd = [sys.executable, "-m", "casp", "compress", str(model), "-o", str(out), "--stream", "--overwrite",
           "--bits", str(args.bits), "--allocation", args.allocation, "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", str(args.calib_seq_len), "--layers", args.layers, "--device", args.device, "--json",
           "--threads", str(args.threads), *(["--calib-jsonl", args.calib_jsonl] if args.calib_jsonl else []),
           *args.compress_flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scale: casp compress failed: {proc.stderr.strip().splitlines()[-1]}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall": wall, "out": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="shaped checkpoint (default ~/.cache/casp/shaped/llava-1.5-7b, with -N for --lm-layers N)")
    p.add_argument("--lm-layers", type=int, default=None,
                   help="a shaped model with only N language-model layers, all compressed; projected by layers")
    p.add_argument("--calib-jsonl", default=None, help="image + text calibration records (casp compress --calib-jsonl)")
    p.add_argument("--out", default=None, help="where to write the compressed model (default: a temp dir)")
    p.add_argument("--layers", default="0,1", help="decoder layers to compress (the others are streamed through)")
    p.add_argument("--bits", type=float, default=2.0)
    p.add_argument("--allocation", default="uniform")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="device for each layer's work (casp compress --device)")
    p.add_argument("--gpu-tflops", type=float, default=20.0, help="assumed sustained GPU rate for the GPU column")
    p.add_argument("--gpu-column-us", type=float, default=50.0,
                   help="assumed GPU latency of one GPTQ column step (microseconds)")
    p.add_argument("--reuse", action="store_true",
                   help="read OUT/compressed/report.json of an earlier run instead of compressing again "
                        "(wall time is then the run's own seconds, without process start-up)")
    args, args.compress_flags = p.parse_known_args(argv)
    if args.model is None:
        name = "llava-1.5-7b" + (f"-{args.lm_layers}" if args.lm_layers else "")
        args.model = str(Path.home() / ".cache" / "casp" / "shaped" / name)
    if args.lm_layers:
        args.layers = ",".join(str(i) for i in range(args.lm_layers))

    res = run(args)
    if args.lm_layers:
        return print_by_layers(args, res["report"], res["wall"])
    report, wall = res["report"], res["wall"]
    rows = report["decoder_layers"]
    matrices = {r["index"]: sum(u["layer"] == r["index"] for u in report["layers"]) for r in rows}
    seven = SHAPES["7B"]
    tokens = report["calibration"]["tokens"]
    per_layer = [r["seconds"] for r in rows]
    mean_layer = sum(per_layer) / len(per_layer)
    rate = layer_flops(seven, tokens) / mean_layer
    overhead = max(wall - sum(per_layer), 0.0) / (seven[2] - len(rows))
    peak = report["peak_rss_mb"] * 2**20
    base = base_rss_bytes()
    k = max((peak - base - working_set(seven, 0.0)) / (8 * seven[1] ** 2), 0.0)
    if peak - base < 4 * rest_params(seven):
        k = 0.0

    print(f"streamed compression of {args.model} ({args.allocation}, {args.bits} bits, {tokens} calibration tokens, "
          f"{args.threads} thread(s)); compressed layers {args.layers}, the rest streamed through")
    print("\nmeasured")
    for r in rows:
        print(f"  layer {r['index']:2d}: {r['seconds']:7.1f} s   ({matrices[r['index']]} matrices)")
    print(f"  whole run: {wall:.0f} s wall, average {report['average_bits']:.4f} bits on the compressed layers, "
          f"peak RSS {peak / 2**30:.2f} GiB (process base {base / 2**30:.2f} GiB)")
    print(f"  GPTQ rate {rate / 1e9:.1f} GFLOP/s; streaming one other layer through (read, run, write) {overhead:.1f} s")
    print(f"  fitted GPTQ work: {k:.2f} x 8 i^2 bytes")
    if report.get("peak_device_mb") is not None:
        print(f"  on {args.device}: peak device memory {report['peak_device_mb'] / 1024:.2f} GiB")
    print("\nprojected (whole model compressed, same calibration tokens)")
    print(f"  {'model':5s} {'params':>7s} {'peak RSS':>9s} {'CPU time':>9s} {'GPU time*':>9s}")
    for name, shape in SHAPES.items():
        params = shape[2] * layer_params(shape) + rest_params(shape)
        rss = base + max(4 * rest_params(shape), working_set(shape, k))
        flops = shape[2] * layer_flops(shape, tokens)
        cpu = flops / rate + overhead * shape[2] * layer_params(shape) / layer_params(seven)
        gpu = flops / (args.gpu_tflops * 1e12) + shape[2] * layer_columns(shape) * args.gpu_column_us * 1e-6
        print(f"  {name:5s} {params / 1e9:6.1f}B {rss / 2**30:7.1f} GiB {cpu / 3600:7.1f} h {gpu / 60:7.1f} min")
    print(f"\n* GPU column: assumed, not measured (no GPU lent): the same FLOPs at {args.gpu_tflops:g} TFLOP/s "
          f"+ {args.gpu_column_us:g} us per GPTQ column.")
    return 0


def print_by_layers(args, report: dict, wall: float) -> int:
    """Measured phases of a run over every layer of an N-layer shaped model, and the 32-layer projection."""
    from casp.config import FISHER_TOKENS
    from casp.steps.plan import PLAN_TOKENS

    phases = report["phase_seconds"]
    n, layers = args.lm_layers, SHAPES["7B"][2]
    tokens = report["calibration"]["tokens"]
    full = phases["compress_layers"] - sum(r["seconds"] for r in report["decoder_layers"])
    fisher_tokens = report["recipe"].get("fisher_tokens", FISHER_TOKENS)
    part = full * (min(1.0, PLAN_TOKENS / tokens) + min(1.0, fisher_tokens / tokens))
    catches = full + (part if args.allocation != "uniform" else 0.0)
    per_layer = (phases["plan_and_allocate"] + phases["compress_layers"] - catches) / n
    fixed = wall - phases["plan_and_allocate"] - phases["compress_layers"] + catches
    flags = " ".join(args.compress_flags) or "(none)"
    print(f"streamed compression of {args.model} ({n} language-model layers of LLaVA-1.5-7B's shapes, all compressed)")
    print(f"  flags: --bits {args.bits} --allocation {args.allocation} {flags}; "
          f"{tokens} calibration tokens in {report['calibration']['batches']} samples; "
          f"{args.threads} thread(s)")
    print("\nmeasured")
    for name, sec in phases.items():
        print(f"  {name:20s} {sec:8.0f} s")
    for r in report["decoder_layers"]:
        print(f"  layer {r['index']:2d} layer pass {r['seconds']:7.0f} s")
    print(f"  catching layer 0's inputs (vision tower, projector, embeddings): {full:.0f} s in the layer pass, "
          f"{part:.0f} s in each plan pass; {catches:.0f} s in all")
    check = report.get("baseline_check") or {}
    print(f"  whole run {wall:.0f} s wall; average {report['average_bits']:.4f} bits; peak RSS "
          f"{report['peak_rss_mb'] / 1024:.2f} GiB; baseline check: {check.get('kept', 'off')}")
    print(f"\nprojected to {layers} layers: {fixed:.0f} s once + {per_layer:.0f} s per layer x {layers} = "
          f"{(fixed + per_layer * layers) / 3600:.1f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
