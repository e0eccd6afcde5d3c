"""Per-layer CPU inference time: packed layers through their format's CPU kernel vs the fallback vs dense.

    python benchmarks/inference.py [--models llama7b smollm2] [--formats scalar e8 aqlm] [--bits 2 3 4]
                                   [--aqlm 2x8] [--batches 1 16] [--threads 0 1] [--reps 15]

For each (out, in) linear shape of LLaMA-7B and SmolLM2-135M, each stored format and batch, three
ways of computing y = x Wᵀ in float32 are timed:
  dense     F.linear with the dequantized float32 weight;
  kernel    PackedLinear with the format's registered CPU kernel (casp.nn.cpu_kernels: scalar
            g128 asymmetric; casp.nn.e8p_kernels: e8p 2/3/4 bits; casp.nn.aqlm_kernels: aqlm MxB, g8);
  fallback  PackedLinear without that kernel: the generic dequantize-slabs + F.linear path (scalar),
            the format's own slab kernel (e8p) or slab / table kernel (aqlm), i.e. what ran before.
Timings are paired: each round times the three once, in a rotating order, so that a slow-down of
the (shared) machine hits all three alike. Reported: the median time of each, and the median over
rounds of the per-round ratios dense/kernel and dense/fallback (speed-ups: > 1 is faster than dense).
--threads 0 means torch's default thread count. Weights are random codes and scales: timing does
not depend on their values. `rel err` is ‖y_kernel - y_dense‖ / ‖y_dense‖; `prep ms` the one-off
repack (or index build) at first use.

`layer_table(...)` prints and returns the table. After it, unless `--no-decode`, the end-to-end section
of `benchmarks/decode.py` runs in the same invocation: decode tokens/s and peak RSS of SmolLM2-135M (FP,
GPTQ 4-bit, CASP 3.25, CASP 2.5) and of the embedded VLM (FP, CASP 2.0), one fresh process per
measurement (compressed models cached under ~/.cache/casp/bench/; the first run compresses them).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from casp.nn import PackedLinear
from casp.quant import QuantizedWeight
from casp.quant.aqlm import aqlm_cpu_matmul, pack_aqlm_codes
from casp.quant.e8 import e8p_cpu_matmul
from casp.quant.kernel_registry import using_matmul_kernel
from casp.quant.packing import pack_codes
from casp.quant.scalar import num_groups

MODELS = {
    "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)],   # (out, in): q/k/v/o, gate/up, down
    "smollm2": [(576, 576), (1536, 576), (576, 1536)],
}


def random_packed(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    """A scalar-format asymmetric weight with random codes, zeros and scales."""
    ng = num_groups(in_f, group)
    codes = torch.cat([
        pack_codes(torch.randint(0, 1 << bits, (min(1024, out_f - r), in_f), generator=gen), bits)
        for r in range(0, out_f, 1024)
    ])
    zeros = pack_codes(torch.randint(0, 1 << bits, (ng, out_f), generator=gen), bits)
    scales = (torch.rand(out_f, ng, generator=gen) * 0.01 + 1e-3).half()
    meta = {"format": "scalar", "bits": bits, "group_size": group, "sym": False,
            "out_features": out_f, "in_features": in_f}
    return QuantizedWeight({"codes": codes, "scales": scales, "zeros": zeros}, meta)


def random_e8p(out_f: int, in_f: int, bits: int, gen: torch.Generator) -> QuantizedWeight:
    """An "e8p" weight with random 16-bit (and residual) codes and 3-bit/4-bit-like stage scales."""
    groups = -(-in_f // 8)

    def e8p_codes():
        return torch.randint(-(1 << 15), 1 << 15, (out_f, groups), generator=gen, dtype=torch.int16)

    tensors = {"codes": e8p_codes(), "scales": torch.tensor([0.01, 0.003][:1 if bits == 2 else 2]).half()}
    if bits == 3:
        tensors["codes2"] = torch.randint(0, 256, (out_f, groups), generator=gen, dtype=torch.uint8)
    elif bits == 4:
        tensors["codes2"] = e8p_codes()
    meta = {"format": "e8p", "method": "e8", "bits": bits, "act_order": False,
            "out_features": out_f, "in_features": in_f}
    return QuantizedWeight(tensors, meta)


def random_aqlm(out_f: int, in_f: int, num_codebooks: int, codebook_bits: int, gen: torch.Generator,
                group: int = 8) -> QuantizedWeight:
    """An "aqlm" weight with random codes, fp16 codebooks and row scales."""
    codes = torch.randint(0, 1 << codebook_bits, (out_f, -(-in_f // group), num_codebooks), generator=gen)
    tensors = {"codes": pack_aqlm_codes(codes, codebook_bits),
               "codebooks": (torch.randn(num_codebooks, 1 << codebook_bits, group, generator=gen) * 0.1).half(),
               "scales": (torch.rand(out_f, generator=gen) + 0.5).half()}
    meta = {"format": "aqlm", "method": "aqlm", "bits": num_codebooks * codebook_bits / group,
            "num_codebooks": num_codebooks, "codebook_bits": codebook_bits, "group_size": group,
            "out_features": out_f, "in_features": in_f}
    return QuantizedWeight(tensors, meta)


@dataclass(frozen=True)
class LayerFormat:
    """One row kind of the table: a label, a random-weight builder and the path that runs without the kernel."""

    label: str
    build: Callable[[int, int, torch.Generator], QuantizedWeight]
    fallback: Callable | None       # the format's kernel before the fast one (None: the generic path)


def layer_formats(formats=("scalar", "e8", "aqlm"), bits=(2, 3, 4), group: int = 128,
                  aqlm=("2x8",)) -> list[LayerFormat]:
    """The row kinds: scalar g`group` and e8p at each of `bits`, aqlm at each "MxB" of `aqlm`."""
    out = []
    if "scalar" in formats:
        out += [LayerFormat(f"scalar-{b}b", lambda o, i, g, b=b: random_packed(o, i, b, group, g), None)
                for b in bits]
    if "e8" in formats:
        out += [LayerFormat(f"e8p-{b}b", lambda o, i, g, b=b: random_e8p(o, i, b, g), e8p_cpu_matmul)
                for b in bits if b in (2, 3, 4)]
    if "aqlm" in formats:
        for spec in aqlm:
            m_count, cb_bits = (int(t) for t in spec.split("x"))
            out.append(LayerFormat(f"aqlm-{spec}", lambda o, i, g, m=m_count, b=cb_bits: random_aqlm(o, i, m, b, g),
                                   aqlm_cpu_matmul))
    return out


def fallback_forward(module: PackedLinear, x: torch.Tensor, fallback) -> torch.Tensor:
    """The module's forward with the format's CPU kernel replaced by `fallback` (None: removed)."""
    with using_matmul_kernel(module.meta["format"], "cpu", fallback):
        return module(x)


def paired_times(fns: dict, reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each fn per round; the order of the fns rotates from round to round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_layer(qw: QuantizedWeight, fallback, batches, reps, gen, time_fallback: bool = True) -> list[dict]:
    """Paired dense / kernel (/ fallback) timings of one packed weight at each batch size."""
    module = PackedLinear.from_quantized(qw)
    out_f, in_f = module.out_features, module.in_features
    dense_w = module.dense_weight()
    t0 = time.perf_counter()
    with torch.inference_mode():
        module(torch.zeros(1, in_f))
    prep_s = time.perf_counter() - t0
    used = module.__dict__.get("_kernel_cache") is not None
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, in_f, generator=gen)
            ref = torch.nn.functional.linear(x, dense_w)
            rel = ((module(x) - ref).norm() / ref.norm()).item()
            fns = {"dense": lambda: torch.nn.functional.linear(x, dense_w), "kernel": lambda: module(x)}
            if time_fallback:
                fns["fallback"] = lambda: fallback_forward(module, x, fallback)
            times = paired_times(fns, reps)
            times.setdefault("fallback", [float("nan")])
            ratio = {name: statistics.median(d / t for d, t in zip(times["dense"], times[name]))
                     for name in ("kernel", "fallback")}
            rows.append({
                "shape": f"{out_f}x{in_f}", "batch": batch,
                "dense_ms": statistics.median(times["dense"]) * 1e3,
                "kernel_ms": statistics.median(times["kernel"]) * 1e3,
                "fallback_ms": statistics.median(times["fallback"]) * 1e3,
                "kernel_speedup": ratio["kernel"], "fallback_speedup": ratio["fallback"],
                "rel_err": rel, "prep_ms": prep_s * 1e3, "kernel_used": used,
            })
    return rows


def layer_table(models=tuple(MODELS), formats: list[LayerFormat] | None = None, batches=(1, 16),
                threads=(0, 1), reps: int = 15, seed: int = 0, time_fallback: bool = True) -> list[dict]:
    """Print (and return) the per-layer table: every thread count × model shape × format × batch."""
    formats = layer_formats() if formats is None else formats
    default_threads = torch.get_num_threads()
    print(f"{'thr':>3} {'out x in':>11} {'format':>10} {'batch':>5} {'dense ms':>9} {'kernel ms':>9} "
          f"{'fallbk ms':>9} {'dense/kern':>10} {'dense/fb':>8} {'rel err':>8} {'prep ms':>8}")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for threads in threads:
            torch.set_num_threads(threads or default_threads)
            for model in models:
                for out_f, in_f in MODELS[model]:
                    for fmt in formats:
                        for r in bench_layer(fmt.build(out_f, in_f, gen), fmt.fallback, batches, reps, gen,
                                             time_fallback):
                            r.update(threads=torch.get_num_threads(), model=model, format=fmt.label)
                            rows.append(r)
                            note = "" if r["kernel_used"] else "  (kernel declined)"
                            print(f"{r['threads']:>3} {r['shape']:>11} {fmt.label:>10} {r['batch']:>5} "
                                  f"{r['dense_ms']:9.3f} {r['kernel_ms']:9.3f} {r['fallback_ms']:9.3f} "
                                  f"{r['kernel_speedup']:10.2f} {r['fallback_speedup']:8.2f} {r['rel_err']:8.1e} "
                                  f"{r['prep_ms']:8.0f}{note}", flush=True)
    finally:
        torch.set_num_threads(default_threads)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--formats", nargs="+", default=["scalar", "e8", "aqlm"], choices=["scalar", "e8", "aqlm"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="scalar and e8 bit-widths")
    ap.add_argument("--group-size", type=int, default=128, help="scalar group size")
    ap.add_argument("--aqlm", nargs="+", default=["2x8"], help="aqlm settings MxB (M codebooks of 2^B entries, g8)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="thread counts to run (0: torch's default)")
    ap.add_argument("--reps", type=int, default=15, help="paired rounds per measurement")
    ap.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode section")
    ap.add_argument("--decode-threads", type=int, default=1, help="torch threads while decoding (default 1)")
    ap.add_argument("--no-fallback", action="store_true",
                    help="do not time the fallback path (seconds per call for the vector formats' slabs)")
    args = ap.parse_args(argv)

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"default threads {torch.get_num_threads()}; float32 inputs")
    print("NOTE: absolute times are noisy (shared, loaded machine); the speed-ups are medians of paired, "
          "alternating rounds and are the figures to read.")
    t_start = time.perf_counter()
    layer_table(args.models, layer_formats(args.formats, args.bits, args.group_size, args.aqlm), args.batches,
                args.threads, args.reps, time_fallback=not args.no_fallback)
    if not args.no_decode:
        from decode import decode_table, format_table

        print(f"\nend-to-end decode: batch 1 greedy, KV cache, 64 new tokens, {args.decode_threads} thread(s)")
        print(format_table(decode_table(threads=args.decode_threads)))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
