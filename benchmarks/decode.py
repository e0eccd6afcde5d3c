"""End-to-end greedy decode speed and peak memory, FP against compressed models, one process per measurement.

    python benchmarks/decode.py [--models smollm2 vlm] [--threads 1] [--new-tokens 64] [--rounds 3]
                                [--repeats 3] [--calib-samples 16] [--compress-threads 1]

Each compressed model is made once by `casp compress` and cached under `$CASP_CACHE/bench/`
(default ~/.cache/casp/bench/); a later run reuses it. Every measurement is a fresh process
(`--worker`) that loads one model, answers the prompt once untimed (warm-up: kernel repacking),
then times `repeats` greedy runs of exactly `new_tokens` tokens with a KV cache
(`casp.generate.measure`: tokens/s over tokens 2..N, prefill excluded). Processes of all
configurations run interleaved, `rounds` times, so that a slow-down of the shared machine hits
them alike; tokens/s is the median over all timed runs of a configuration.

Memory, per process: `peak_rss_mb` is the process's peak (ru_maxrss read before and after the reset
below; loading included: a compressed model is built
dense and then replaced, so its load peak is near FP's); `decode_rss_mb` is the peak resident set
from the end of loading to the end of decoding (VmHWM after returning freed heap with glibc's
malloc_trim and resetting the peak through /proc/self/clear_refs; NaN where the kernel does not
allow the reset). Both include the interpreter, torch and transformers (~300 MB).

`decode_table(...)` returns the rows and is what other benchmarks import; `format_table(rows)`
prints them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SMOLLM2_PROMPT = "Write a short story about a robot who learns to paint."
VLM_PROMPT = "describe the image ."


@dataclass(frozen=True)
class BenchModel:
    """One row: a model argument (None: the embedded VLM) and the `casp compress` flags that make it (None: FP)."""

    label: str
    family: str
    model: str | None
    compress: tuple[str, ...] | None = None
    image: bool = False

    @property
    def slug(self) -> str:
        base = self.model or "embedded"
        return base + "_" + "_".join(a.lstrip("-") for a in self.compress)


CONFIGS: dict[str, list[BenchModel]] = {
    "smollm2": [
        BenchModel("FP (fp32)", "smollm2", "smollm2-135m"),
        BenchModel("GPTQ 4-bit g128 uniform", "smollm2", "smollm2-135m", ("--allocation", "uniform", "--bits", "4")),
        BenchModel("CASP 3.25", "smollm2", "smollm2-135m", ("--bits", "3.25")),
        BenchModel("CASP 2.5", "smollm2", "smollm2-135m", ("--bits", "2.5")),
    ],
    "vlm": [
        BenchModel("FP (fp32)", "embedded VLM", None, image=True),
        BenchModel("CASP 2.0", "embedded VLM", None, ("--bits", "2.0"), image=True),
    ],
}


def bench_cache() -> Path:
    from casp.models.real_models import cache_dir

    return cache_dir() / "bench"


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def compressed_dir(cfg: BenchModel, calib_samples: int, threads: int) -> Path:
    """The cached output of `casp compress` for `cfg`, made now if absent."""
    out = bench_cache() / f"{cfg.slug}_c{calib_samples}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "casp", "compress", *([cfg.model] if cfg.model else []), "-o", str(out),
            *cfg.compress, "--calib-samples", str(calib_samples), "--quiet", "--overwrite"]
    print(f"compressing {cfg.family} {cfg.label} -> {out}", file=sys.stderr, flush=True)
    proc = subprocess.run(args, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"casp compress failed for {cfg.label}: {proc.stderr.strip()[-2000:]}")
    return out


def scene_image() -> Path:
    """A test-split scene of the embedded model's world, written once into the bench cache."""
    from casp.embedded.scenes import make_scene

    path = bench_cache() / "scene_test_0.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_scene("test", 0).image.save(path)
    return path


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc keeps what loading freed), then restart the peak-RSS count."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def worker(model: str | None, prompt: str, image: str | None, new_tokens: int, repeats: int, threads: int) -> dict:
    """One measurement process: load, warm up, time; memory and timings as a dict."""
    import torch

    from casp.generate import build_inputs, load, measure, peak_rss_mb

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net, processor, _ = load(model)
    load_s = time.perf_counter() - t0
    inputs = build_inputs(processor, prompt, image)
    load_peak = peak_rss_mb()
    reset = _reset_peak_rss()
    res = measure(net, inputs, new_tokens, repeats)
    tokenizer = getattr(processor, "tokenizer", processor)
    decode_peak = _vm_hwm_mb() if reset else math.nan
    return {"runs_tokens_per_s": res["runs_tokens_per_s"], "prefill_s": res["prefill_s"], "load_s": load_s,
            "new_tokens": res["new_tokens"], "text": tokenizer.decode(res["tokens"], skip_special_tokens=True).strip(),
            "peak_rss_mb": max(load_peak, peak_rss_mb()), "decode_rss_mb": decode_peak,
            "threads": torch.get_num_threads()}


def _spawn(model: str | None, image: Path | None, prompt: str, new_tokens: int, repeats: int, threads: int) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", model or "", "--prompt", prompt,
            "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--threads", str(threads)]
    if image is not None:
        args += ["--image", str(image)]
    proc = subprocess.run(args, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"decode worker failed for {model}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class _Row:
    cfg: BenchModel
    path: str | None
    runs: list[dict] = field(default_factory=list)


def _average_bits(path: str) -> float:
    return json.loads((Path(path) / "report.json").read_text())["average_bits"]


def decode_table(models: tuple[str, ...] = ("smollm2", "vlm"), threads: int = 1, new_tokens: int = 64,
                 rounds: int = 3, repeats: int = 3, calib_samples: int = 16, compress_threads: int = 1,
                 configs: dict[str, list[BenchModel]] | None = None) -> list[dict]:
    """Decode tokens/s and peak RSS of each configuration of `models`, one fresh process per measurement.

    Returns one dict per configuration: family, label, average_bits (None for FP), tokens_per_s (median over
    rounds × repeats runs), min/max of the per-process medians, speed_vs_fp (against the family's
    first row), prefill_s, peak_rss_mb, decode_rss_mb, load_s, threads, text (the greedy answer).
    """
    configs = configs or CONFIGS
    rows = []
    for name in models:
        for cfg in configs[name]:
            path = str(compressed_dir(cfg, calib_samples, compress_threads)) if cfg.compress else cfg.model
            rows.append(_Row(cfg, path))
    image = scene_image() if any(r.cfg.image for r in rows) else None
    for r in range(rounds):
        for row in rows:
            prompt = VLM_PROMPT if row.cfg.image else SMOLLM2_PROMPT
            print(f"round {r + 1}/{rounds}: {row.cfg.family} {row.cfg.label}", file=sys.stderr, flush=True)
            row.runs.append(_spawn(row.path, image if row.cfg.image else None, prompt, new_tokens, repeats, threads))
    out, fp = [], {}
    for row in rows:
        speeds = [s for run in row.runs for s in run["runs_tokens_per_s"]]
        per_process = [statistics.median(run["runs_tokens_per_s"]) for run in row.runs]
        tps = statistics.median(speeds)
        fp.setdefault(row.cfg.family, tps)
        out.append({
            "family": row.cfg.family, "label": row.cfg.label, "model": row.path or "embedded",
            "average_bits": _average_bits(row.path) if row.cfg.compress else None,
            "tokens_per_s": tps, "tokens_per_s_min": min(per_process), "tokens_per_s_max": max(per_process),
            "speed_vs_fp": tps / fp[row.cfg.family],
            "prefill_s": statistics.median(run["prefill_s"] for run in row.runs),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in row.runs),
            "decode_rss_mb": max(run["decode_rss_mb"] for run in row.runs),
            "load_s": statistics.median(run["load_s"] for run in row.runs),
            "new_tokens": row.runs[0]["new_tokens"], "threads": row.runs[0]["threads"], "text": row.runs[0]["text"],
        })
    return out


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `decode_table` rows."""
    lines = ["| model | config | avg bits | decode tok/s (min–max of processes) | × FP | prefill ms | "
             "peak RSS MB | decode RSS MB | answer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        answer = r["text"].replace("\n", " ").replace("|", "/")
        answer = answer if len(answer) <= 40 else answer[:37] + "..."
        bits = "–" if r["average_bits"] is None else f"{r['average_bits']:.3f}"
        lines.append(f"| {r['family']} | {r['label']} | {bits} | {r['tokens_per_s']:.1f} "
                     f"({r['tokens_per_s_min']:.1f}–{r['tokens_per_s_max']:.1f}) | {r['speed_vs_fp']:.2f} | "
                     f"{r['prefill_s'] * 1e3:.0f} | {r['peak_rss_mb']:.0f} | {r['decode_rss_mb']:.0f} | {answer} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads while decoding (default 1)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per timed run (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per configuration, interleaved (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process (default 3)")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration samples of each compression (default 16)")
    ap.add_argument("--compress-threads", type=int, default=1, help="torch threads of each compression (default 1)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker or None, args.prompt, args.image, args.new_tokens, args.repeats,
                                args.threads)))
        return
    import torch

    rows = decode_table(tuple(args.models), threads=args.threads, new_tokens=args.new_tokens, rounds=args.rounds,
                        repeats=args.repeats, calib_samples=args.calib_samples, compress_threads=args.compress_threads)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), batch 1 greedy, {args.new_tokens} new tokens, "
          f"{args.rounds} processes × {args.repeats} runs per row")
    print(format_table(rows))


if __name__ == "__main__":
    main()
