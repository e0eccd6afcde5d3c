"""How far the damage estimate's layer-to-layer scale is off on one model, and what that does to an allocation.

Measures the plan once (GPTQ candidates, every matrix quantized whole on the original model's inputs, as
`--search-steps` keeps them) on --calib-samples samples of the model's calibration data, holds out
--held-out of them, then:
1. per decoder layer and per probe setting (--probes, default 2b-g128,3b-g128,4b-g128): every dense matrix of
   that layer alone at the probe, KL(FP ‖ model) on the held-out samples, against the layer's summed
   estimate; prints the table of KL / estimate (what `--damage measured` uses as the layer's scale);
2. allocations at each --targets (rd, per matrix, Q/K dense) with the estimate and with it scaled per layer
   by the probes (one probe, or log-linear between all of them), each put into the model with its quantized
   weights: bits, perplexity on the first --eval-chars characters of both shipped evaluation texts (ctx
   512), and held-out KL; then the uniform setting at each probe.

Usage: python benchmarks/layer_scales.py [--model gemma3-270m] [--threads 2] [--targets 3.25]
"""
from __future__ import annotations

import argparse
import re
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=4)
    ap.add_argument("--probes", default="2b-g128,3b-g128,4b-g128")
    ap.add_argument("--targets", default="2.5,3.25")
    ap.add_argument("--eval-chars", type=int, default=30000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from casp.algorithms import allocate as alloc
    from casp.config import CompressionConfig
    from casp.data.calibration import hold_out
    from casp.data.textdata import evaluation_texts
    from casp.eval.text_ppl import text_perplexity
    from casp.io.memory_writer import MemoryWriter
    from casp.pipeline import start
    from casp.recipe import resolve
    from casp.steps.allocation import solve
    from casp.steps.layer_scales import scale_at
    from casp.steps.plan import plan_ranks_and_units
    from casp.steps.search import WeightSwapper, kl_to_reference, reference_logprobs

    cfg = CompressionConfig(bits=3.25, quantizer="gptq", qk_rank=0, calib_samples=args.calib_samples,
                            search_steps=1, search_samples=args.held_out, granularity="matrix",
                            damage="estimate", seed=0)
    t0 = time.time()
    run, batches = start(args.model, resolve(cfg, args.model), MemoryWriter(None, overwrite=False), None, False, None)
    batches, held = hold_out(batches, args.held_out)
    measured = plan_ranks_and_units(run, batches)
    allocation = solve(run, measured.units, rule="rd")
    print(f"plan measured in {time.time() - t0:.0f} s", flush=True)
    model, units = run.model, allocation.units
    reference = reference_logprobs(model, held)
    swapper = WeightSwapper(run.layers, measured.database)
    tokenizer = getattr(run.processor, "tokenizer", run.processor)
    texts = {k: v[:args.eval_chars] for k, v in evaluation_texts().items()}

    def kl(choice):
        swapper.apply(allocation, choice)
        try:
            return kl_to_reference(model, held, reference)
        finally:
            swapper.restore()

    def ppl(choice):
        swapper.apply(allocation, choice)
        try:
            return [text_perplexity(model, tokenizer, t, context_length=512, progress=False)["text_ppl"]
                    for t in texts.values()]
        finally:
            swapper.restore()

    def bits_of(label):
        return float(re.match(r"(\d+)b", label).group(1))

    probes = args.probes.split(",")
    layers = sorted({u.layer_index for u in units})
    ratio = {}
    print("\n| layer | " + " | ".join(f"estimate at {p} | KL | KL / estimate" for p in probes) + " |")
    print("|---|" + "---|---|---|" * len(probes))
    for i in layers:
        cells = []
        for p in probes:
            names = [u.name for u in units if u.layer_index == i and p in u.distortion]
            est = sum(u.distortion[p] for u in units if u.name in names)
            k = kl({n: p for n in names})
            ratio[(i, p)] = k / est
            cells.append(f"{est:.3g} | {k:.4f} | {k / est:.3g}")
        print(f"| {i} | " + " | ".join(cells) + " |", flush=True)

    def scaled(mode):
        if mode == "estimate":
            return lambda i, label: 1.0
        if mode == "all probes":
            return lambda i, label: scale_at([(bits_of(p), ratio[(i, p)]) for p in probes], bits_of(label))
        return lambda i, label: ratio[(i, mode)]

    total = sum(u.num_weights for u in units)
    names = ["FP", "estimate", *(f"measured at {p}" for p in probes), *(["measured, all probes"] if len(probes) > 1 else [])]
    print(f"\n| allocation (per matrix, Q/K dense) | bits | ppl {' | ppl '.join(texts)} | held-out KL |\n|---|---|---|---|---|")
    fp = ppl({})
    print(f"| FP | 16 | {' | '.join(f'{x:.2f}' for x in fp)} | 0 |", flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        for name in names[1:]:
            mode = "estimate" if name == "estimate" else "all probes" if "all" in name else name.split()[-1]
            scale = scaled(mode)
            problem = [alloc.Unit(name=u.name, num_weights=u.num_weights, cost_bits=u.cost_bits,
                                  distortion={k: v * scale(u.layer_index, k) for k, v in u.distortion.items()},
                                  layer_index=u.layer_index, kind=u.kind) for u in units]
            choice = dict(alloc.allocate_rd(problem, target, solver="best").choice)
            bits = sum(u.cost_bits[choice[u.name]] for u in units) / total
            print(f"| {name} @ {target} | {bits:.3f} | {' | '.join(f'{x:.2f}' for x in ppl(choice))} | "
                  f"{kl(choice):.4f} |", flush=True)
    for p in probes:
        choice = {u.name: p for u in units}
        bits = sum(u.cost_bits[p] for u in units) / total
        print(f"| uniform {p} | {bits:.3f} | {' | '.join(f'{x:.2f}' for x in ppl(choice))} | {kl(choice):.4f} |",
              flush=True)
    print(f"\ntotal {time.time() - t0:.0f} s; {len(layers)} layers, {len(units)} matrices")


if __name__ == "__main__":
    main()
