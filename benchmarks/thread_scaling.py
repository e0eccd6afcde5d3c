"""How casp's heavy CPU kernels scale with torch threads: seconds at 1 and at `--threads` threads, and the ratio.

    python benchmarks/thread_scaling.py [--threads 2] [--repeats 2]

Kernels, on SmolLM2-135M-sized shapes with random data (seeded): XᵀX of 16k tokens × 1536, the block LDL of a
1536 × 1536 H, E8P encoding and decoding of 200,000 vectors at the 2-bit operating RMS, and every E8 candidate
of a 256 × 1536 matrix (2, 3 and 4 bits × 4 scales, one BlockLDLQ sweep: the measuring pass's inner loop).
Each figure is the median of `--repeats` runs. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def kernels() -> dict:
    from casp.algorithms.e8p import StageSpec, e8p_decode, e8p_encode, quantize_candidates
    from casp.algorithms.ldlq import block_ldl
    from casp.quant.e8 import E8Quantizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 1536, generator=g)
    h = (x.T @ x).double() + 1e-2 * torch.eye(1536, dtype=torch.float64)
    v = 1.03 * torch.randn(200_000, 8, generator=g)
    codes = e8p_encode(v)[0]
    w = torch.randn(256, 1536, generator=g)
    options = E8Quantizer().config
    specs = [StageSpec(b, *options.rho_and_resid(b)) for b in (2, 3, 4)]
    return {
        "XᵀX of 16k × 1536": lambda: x.T @ x,
        "block LDL of a 1536 × 1536 H": lambda: block_ldl(h, 8),
        "E8P encoding of 200k vectors": lambda: e8p_encode(v),
        "E8P decoding of 200k codes": lambda: e8p_decode(codes),
        "every E8 candidate of 256 × 1536 (2, 3, 4 bits × 4 scales)":
            lambda: quantize_candidates(w, h.float(), specs, multipliers=(0.8, 0.9, 1.0, 1.1)),
    }


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    table = kernels()
    print(f"| kernel | 1 thread s | {args.threads} threads s | speed-up |")
    print("|---|---|---|---|")
    for name, fn in table.items():
        fn()   # warm-up: tables, caches, first allocation
        torch.set_num_threads(1)
        one = seconds(fn, args.repeats)
        torch.set_num_threads(args.threads)
        many = seconds(fn, args.repeats)
        print(f"| {name} | {one:.3f} | {many:.3f} | {one / many:.2f} |", flush=True)


if __name__ == "__main__":
    main()
