"""Per-layer CPU inference time: packed scalar layers through the int4 kernel vs the generic path vs dense.

    python benchmarks/inference.py [--models llama7b smollm2] [--bits 2 3 4] [--batches 1 16]
                                   [--threads 0 1] [--reps 15]

For each (out, in) linear shape of LLaMA-7B and SmolLM2-135M, each bit-width (g128 asymmetric by
default) and batch, three ways of computing y = x Wᵀ in float32 are timed:
  dense    F.linear with the dequantized float32 weight;
  kernel   PackedLinear with the scalar format's CPU kernel (casp.nn.cpu_kernels, bfloat16 compute);
  generic  PackedLinear with the kernel unregistered (dequantize slabs + F.linear).
Timings are paired: each round times the three once, in a rotating order, so that a slow-down of
the (shared) machine hits all three alike. Reported: the median time of each, and the median over
rounds of the per-round ratios dense/kernel and dense/generic (speed-ups: > 1 is faster than dense).
--threads 0 means torch's default thread count. Weights are random codes and scales: timing does
not depend on their values. `rel err` is ‖y_kernel - y_dense‖ / ‖y_dense‖.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from casp.nn import PackedLinear
from casp.nn.cpu_kernels import scalar_cpu_matmul
from casp.quant import QuantizedWeight
from casp.quant.packing import pack_codes
from casp.quant.scalar import SCALAR_FORMAT, num_groups

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


def generic_forward(module: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """The module's forward with the CPU kernel unregistered for the call."""
    kernel = SCALAR_FORMAT.kernels.pop("cpu", None)
    try:
        return module(x)
    finally:
        if kernel is not None:
            SCALAR_FORMAT.kernels["cpu"] = kernel


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


def bench_layer(out_f, in_f, bits, group, batches, reps, gen) -> list[dict]:
    qw = random_packed(out_f, in_f, bits, group, gen)
    module = PackedLinear.from_quantized(qw)
    dense_w = module.dequantized_weight()
    t0 = time.perf_counter()
    probe = scalar_cpu_matmul(module, torch.zeros(1, in_f))
    repack_s = time.perf_counter() - t0
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, in_f, generator=gen)
            ref = torch.nn.functional.linear(x, dense_w)
            kernel_y = module(x)
            rel = ((kernel_y - ref).norm() / ref.norm()).item() if probe is not None else float("nan")
            times = paired_times({
                "dense": lambda: torch.nn.functional.linear(x, dense_w),
                "kernel": lambda: module(x),
                "generic": lambda: generic_forward(module, x),
            }, reps)
            ratio = {name: statistics.median(d / t for d, t in zip(times["dense"], times[name]))
                     for name in ("kernel", "generic")}
            rows.append({
                "shape": f"{out_f}x{in_f}", "bits": bits, "batch": batch,
                "dense_ms": statistics.median(times["dense"]) * 1e3,
                "kernel_ms": statistics.median(times["kernel"]) * 1e3,
                "generic_ms": statistics.median(times["generic"]) * 1e3,
                "kernel_speedup": ratio["kernel"], "generic_speedup": ratio["generic"],
                "rel_err": rel, "repack_ms": repack_s * 1e3, "kernel_used": probe is not None,
            })
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="thread counts to run (0: torch's default)")
    ap.add_argument("--reps", type=int, default=15, help="paired rounds per measurement")
    args = ap.parse_args(argv)

    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"default threads {default_threads}; scalar format g{args.group_size} asymmetric, float32 inputs")
    print("NOTE: absolute times are noisy (shared, loaded machine); the speed-ups are medians of paired, "
          "alternating rounds and are the figures to read.")
    print(f"{'thr':>3} {'out x in':>11} {'bits':>4} {'batch':>5} {'dense ms':>9} {'kernel ms':>9} "
          f"{'generic ms':>10} {'dense/kern':>10} {'dense/gen':>9} {'rel err':>8} {'repack ms':>9}")
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for model in args.models:
            for out_f, in_f in MODELS[model]:
                for bits in args.bits:
                    for r in bench_layer(out_f, in_f, bits, args.group_size, args.batches, args.reps, gen):
                        used = "" if r["kernel_used"] else "  (kernel declined)"
                        print(f"{torch.get_num_threads():>3} {r['shape']:>11} {r['bits']:>4} {r['batch']:>5} "
                              f"{r['dense_ms']:9.3f} {r['kernel_ms']:9.3f} {r['generic_ms']:10.3f} "
                              f"{r['kernel_speedup']:10.2f} {r['generic_speedup']:9.2f} {r['rel_err']:8.1e} "
                              f"{r['repack_ms']:9.0f}{used}", flush=True)
    torch.set_num_threads(default_threads)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
