"""Packed (on-the-fly dequantized) vs dense matmul at LLaMA-7B linear shapes.

    python benchmarks/packed_matmul.py [--threads 1] [--reps 3] [--bits 2 3 4] [--batches 1 16]

Weights are random codes/scales in the scalar format (g128, asymmetric): timing does not depend
on the values. Dense runs in float32 on CPU and float16 on CUDA. The ratio is packed / dense.
"""
from __future__ import annotations

import argparse
import time

import torch

from casp.nn.packed_linear import PackedLinear
from inference import random_packed

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
GROUP = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run(device: torch.device, bits_list, batches, reps: int) -> list[tuple]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        for bits in bits_list:
            qw = random_packed(out_f, in_f, bits, GROUP, gen)
            packed = PackedLinear.from_quantized(qw).to(device)
            dense_w = packed.dense_weight().to(dtype)
            bpw = packed.stored_bits() / (out_f * in_f)
            with torch.inference_mode():
                for batch in batches:
                    x = torch.randn(batch, in_f, generator=gen).to(device=device, dtype=dtype)
                    t_dense = time_ms(lambda: torch.nn.functional.linear(x, dense_w), device, reps)
                    t_packed = time_ms(lambda: packed(x), device, reps)
                    rows.append((device.type, f"{out_f}x{in_f}", bits, bpw, batch, t_dense, t_packed))
            del dense_w, packed, qw
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machine)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"dense dtype: float32 on CPU, float16 on CUDA; scalar format g{GROUP} asym")
    print(f"{'dev':4} {'out x in':>11} {'bits':>4} {'b/w':>5} {'batch':>5} "
          f"{'dense ms':>9} {'packed ms':>10} {'ratio':>6}")
    t0 = time.perf_counter()
    for device in devices:
        for dev, shape, bits, bpw, batch, td, tp in run(device, args.bits, args.batches, args.reps):
            print(f"{dev:4} {shape:>11} {bits:>4} {bpw:5.2f} {batch:>5} {td:9.2f} {tp:10.2f} {tp / td:6.1f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
