"""Does the allocator's damage estimate predict end-to-end damage? Spearman's rho over random allocations.

On one model: measure every matrix's damage at every candidate (and the joint W_q / W_k rank options)
once, keeping each quantized weight; then draw --allocations random allocations (targets uniform in
[--low, --high], random settings and ranks, repaired to the exact budget), and for each compare the
predicted total damage (the allocator's objective) with KL(FP ‖ model) measured on held-out calibration
samples with those weights in place. Prints each allocation and Spearman's rho; also rho of a per-layer
linear model (HIGGS-style coefficients fitted by least squares on half of the allocations, scored on the
other half).

The weights come from the measurement pass (each matrix quantized on the original model's inputs), as in
EvoPress's database; a sequential compression run differs slightly.

With --single SETTING (e.g. 2b-g128): instead of random allocations, each matrix alone is put at SETTING (every
other weight FP) and its held-out KL measured, next to the estimate's damage for it and the measured damage
(`--damage measured-types`: the estimate scaled per layer and per projection type to the KL of the whole
layer, and of every matrix of the type, at the probe settings, on the other half of the held-out samples).
Prints one row per matrix; Spearman's rho against the KL over those matrices of the estimate, of the damage
scaled per layer alone (`--damage measured`) and of the damage scaled per layer and type; and per projection
type the median of measured KL / estimated damage: the types whose ratio stands apart are those the estimate
misjudges.

With --ratio-rows (the E8 lattice under incoherence, as a run sets it): the proxy a run measures with against
the measurement it replaces. A run measures a probed matrix's damage at its probe setting on the whole matrix and
every other setting on `--e8-ratio-rows` rows, as a ratio to the probe setting on those rows
(`casp.steps.measure`). Here the plan is measured twice on the same inputs: so, and exactly (every row of every
matrix at every setting). Prints per bit-width the mean relative error, Spearman's rho over every (matrix,
setting) pair and within each matrix, and then the allocation each table leads to at `--target`: its bits, its
exact damage and its held-out KL (with the exactly measured weights in place, on held-out samples that the layer
scales never saw).

Usage: python benchmarks/allocation_proxy.py [--model smollm2-135m|gemma3-270m|embedded] [--allocations 24]
       [--quantizer gptq] [--single 2b-g128 [--single-layers 0,3,6]] [--calib-seq-len 512]
       [--ratio-rows [--layers 0,6,12] [--target 3.25]]
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def random_choice(allocation, target: float, total_weights: int, rng: random.Random) -> dict[str, str] | None:
    """Random labels, then random single-rung moves until the cost is within [target - 0.1, target] bits."""
    from casp.steps.search import _ladders

    ladders = _ladders(allocation)
    cost = {u.name: u.cost_bits for u in allocation.units}
    budget = int(target * total_weights)
    choice = {n: rng.choice(ladders[n]) for n in ladders}
    names = list(ladders)
    for _ in range(20000):
        total = sum(cost[n][choice[n]] for n in choice)
        if budget - 0.1 * total_weights <= total <= budget:
            return choice
        n = rng.choice(names)
        i = ladders[n].index(choice[n])
        if total > budget and i > 0:
            choice[n] = ladders[n][i - 1]
        elif total < budget and i + 1 < len(ladders[n]):
            choice[n] = ladders[n][i + 1]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--transform", default=None)
    ap.add_argument("--allocations", type=int, default=24)
    ap.add_argument("--low", type=float, default=2.25)
    ap.add_argument("--high", type=float, default=4.25)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--single", help="measure each matrix alone at this setting label instead")
    ap.add_argument("--single-layers", help="with --single: only the matrices of these layers (comma-separated)")
    ap.add_argument("--ratio-rows", action="store_true",
                    help="the E8 row-ratio damages against exact ones (sets --quantizer e8 --transform incoherence)")
    ap.add_argument("--layers", help="with --ratio-rows: only these decoder layers (comma-separated)")
    ap.add_argument("--target", type=float, default=3.25, help="with --ratio-rows: the allocation's average bits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ratio_rows:
        ratio_proxy(args)
        return

    from casp.config import CompressionConfig
    from casp.data.calibration import hold_out
    from casp.io.memory_writer import MemoryWriter
    from casp.pipeline import start
    from casp.recipe import resolve
    from casp.steps.allocation import solve
    from casp.steps.plan import plan_ranks_and_units
    from casp.steps.search import WeightSwapper, kl_to_reference, reference_logprobs

    model_name = None if args.model == "embedded" else args.model
    cfg = CompressionConfig(bits=args.high, quantizer=args.quantizer, qk_rank=0 if args.single else "joint", transform=args.transform,
                            calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, search_steps=1, search_samples=args.held_out,
                            granularity="matrix", seed=args.seed, damage="measured-types" if args.single else "estimate")
    t0 = time.time()
    run, batches = start(model_name, resolve(cfg, model_name), MemoryWriter(None, overwrite=False), None, True, None)
    model, layers = run.model, run.layers
    batches, held = hold_out(batches, args.held_out)
    scales_on = []
    if args.single:   # the layer scales are measured on half the held-out samples, the matrices on the other half
        scales_on, held = hold_out(held, args.held_out // 2)
    layer_alone = _record_layer_alone_scales()
    measured = plan_ranks_and_units(run, batches, scales_on)
    allocation = solve(run, measured.units, measured.qk_tables, rule="rd")
    database = measured.database
    print(f"measured {len(allocation.units)} units in {time.time() - t0:.0f} s", flush=True)
    if measured.scale_trust is not None:
        print(f"layer scales: share of their spread kept over sample noise {measured.scale_trust}", flush=True)
    if measured.type_scales:
        print("type scales: " + ", ".join(f"{m} {f:.3g}" for m, f in measured.type_scales.items())
              + f"; share of their spread kept {measured.type_trust}", flush=True)
    reference = reference_logprobs(model, held)
    swapper = WeightSwapper(layers, database)
    if args.single:
        only = {int(i) for i in args.single_layers.split(",")} if args.single_layers else None
        single(args.single, allocation, measured, run.codec, swapper, model, held, reference, only, layer_alone)
        print(f"total {time.time() - t0:.0f} s")
        return
    total_weights = sum(u.num_weights for u in allocation.units)
    layer_of = {u.name: u.layer_index for u in allocation.units}
    rng = random.Random(args.seed)
    rows = []
    print("| # | target | average bits | predicted damage | KL(FP ‖ model) held out |\n|---|---|---|---|---|")
    while len(rows) < args.allocations:
        target = rng.uniform(args.low, args.high)
        choice = random_choice(allocation, target, total_weights, rng)
        if choice is None:
            continue
        swapper.apply(allocation, choice)
        kl = kl_to_reference(model, held, reference)
        swapper.restore()
        bits = sum(u.cost_bits[choice[u.name]] for u in allocation.units) / total_weights
        per_layer: dict[int, float] = {}
        for u in allocation.units:
            per_layer[layer_of[u.name]] = per_layer.get(layer_of[u.name], 0.0) + u.distortion[choice[u.name]]
        rows.append((target, bits, allocation.objective(choice), kl, per_layer))
        print(f"| {len(rows)} | {target:.3f} | {bits:.3f} | {rows[-1][2]:.4g} | {kl:.5f} |", flush=True)
    rho = spearman([r[2] for r in rows], [r[3] for r in rows])
    print(f"\nSpearman rho(predicted damage, measured KL) = {rho:.3f} over {len(rows)} allocations")
    n_layers = len(layers)
    x = torch.tensor([[r[4].get(i, 0.0) for i in range(n_layers)] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    half = len(rows) // 2
    coef = torch.linalg.lstsq(x[:half] + 1e-12, y[:half, None], rcond=None).solution.clamp_min(0)
    pred = (x[half:] @ coef).squeeze(1).tolist()
    print(f"per-layer fitted coefficients (fit on {half}, scored on {len(rows) - half}): "
          f"rho = {spearman(pred, y[half:].tolist()):.3f}; the plain sum on the same half: "
          f"rho = {spearman([r[2] for r in rows[half:]], y[half:].tolist()):.3f}")
    print(f"total {time.time() - t0:.0f} s")


def ratio_proxy(args) -> None:
    """The row-ratio damages of an E8 + incoherence plan against the same plan measured exactly (module docstring)."""
    import dataclasses

    from casp.config import CompressionConfig
    from casp.data.calibration import hold_out
    from casp.io.memory_writer import MemoryWriter
    from casp.pipeline import start
    from casp.recipe import resolve
    from casp.steps.allocation import solve
    from casp.steps.plan import plan_ranks_and_units
    from casp.steps.search import WeightSwapper, kl_to_reference, reference_logprobs

    model_name = None if args.model == "embedded" else args.model
    layers = tuple(int(i) for i in args.layers.split(",")) if args.layers else None
    cfg = CompressionConfig(bits=args.target, quantizer="e8", transform="incoherence", qk_rank=0,
                            calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, search_steps=1,
                            search_samples=args.held_out, seed=args.seed, damage="measured", layers=layers)
    t0 = time.time()
    run, batches = start(model_name, resolve(cfg, model_name), MemoryWriter(None, overwrite=False), None, True, None)
    print(f"rows per ratio: {run.codec.quantizer.ratio_rows}", flush=True)
    batches, held = hold_out(batches, args.held_out)
    scales_on, held = hold_out(held, args.held_out // 2)
    exact = plan_ranks_and_units(run, batches, scales_on)
    t1 = time.time()
    run.recipe = dataclasses.replace(run.recipe, search_steps=0)
    proxy = plan_ranks_and_units(run, batches, scales_on)
    print(f"exact plan {t1 - t0:.0f} s, the run's plan {time.time() - t1:.0f} s", flush=True)
    pairs = _damage_pairs(exact.units, proxy.units, run.codec)
    _print_agreement(pairs)
    database, model = exact.database, run.model
    reference = reference_logprobs(model, held)
    swapper = WeightSwapper(run.layers, database)
    exact_units = {u.key: u for u in exact.units}
    print(f"\n| damages allocated at {args.target} | average bits | exact damage of its choice | held-out KL |"
          "\n|---|---|---|---|")
    for name, measured in (("exact", exact), ("row ratios (the run's)", proxy)):
        allocation = solve(run, measured.units, rule="rd")
        total = sum(u.num_weights for u in allocation.units)
        bits = sum(u.cost_bits[allocation.choice[u.name]] for u in allocation.units) / total
        damage = sum(exact_units[key].distortion[label] for n, label in allocation.choice.items()
                     for key in allocation.members[n])
        swapper.apply(allocation, allocation.choice)
        kl = kl_to_reference(model, held, reference)
        swapper.restore()
        print(f"| {name} | {bits:.3f} | {damage:.4g} | {kl:.5f} |", flush=True)
    print(f"total {time.time() - t0:.0f} s")


def _damage_pairs(exact_units, proxy_units, codec) -> list[tuple[str, float, float, float]]:
    """(matrix, bits of the setting, exact damage, proxy damage) for every ratio-measured unit and setting."""
    from casp.steps.measure import is_probed

    bits = {s.label(): s.bits for s in codec.candidates()}
    proxy = {str(u.key): u for u in proxy_units}
    return [(str(u.key), bits[label], d, proxy[str(u.key)].distortion[label])
            for u in exact_units if is_probed(u) for label, d in u.distortion.items()]


def _print_agreement(pairs) -> None:
    """Mean relative error per bit-width; Spearman's rho over all pairs and within each matrix."""
    print("| bits | matrices | mean relative error | largest |\n|---|---|---|---|")
    for b in sorted({p[1] for p in pairs}):
        errors = [abs(q - d) / d for _, bb, d, q in pairs if bb == b and d > 0]
        print(f"| {b} | {len(errors)} | {100 * sum(errors) / len(errors):.1f} % | {100 * max(errors):.1f} % |")
    print(f"Spearman rho over all {len(pairs)} (matrix, setting) pairs: "
          f"{spearman([p[2] for p in pairs], [p[3] for p in pairs]):.4f}")
    by_matrix: dict[str, list] = {}
    for name, _, d, q in pairs:
        by_matrix.setdefault(name, []).append((d, q))
    within = [spearman([d for d, _ in v], [q for _, q in v]) for v in by_matrix.values() if len(v) > 2]
    print(f"within each of {len(within)} matrices, over its settings: mean rho {sum(within) / len(within):.4f}, "
          f"lowest {min(within):.4f}")


def _record_layer_alone_scales() -> dict:
    """layer -> its scale fitted before any type scale (measured damage per layer only), filled during the plan."""
    import casp.steps.layer_scales as step

    seen: dict = {}
    fit = step._fit_layers

    def first_fit(per_layer, by_layer, label, types):
        result = fit(per_layer, by_layer, label, types)
        if not types:
            seen.update(result[0])
        return result

    step._fit_layers = first_fit
    return seen


def single(label: str, allocation, measured, codec, swapper, model, held, reference, only=None,
           layer_alone=None) -> None:
    """Each matrix alone at `label` (of the layers in `only`, if given): estimated and measured damage against
    measured held-out KL; with `layer_alone`, also the damage scaled per layer only."""
    from casp.steps.costs import unit_cost
    from casp.steps.layer_scales import unit_scale
    from casp.steps.search import kl_to_reference

    setting = {s.label(): s for s in codec.candidates()}[label]
    units = {str(u.key): u for u in measured.units}
    rows = []
    print(f"| matrix | estimated damage at {label} | measured damage | KL(FP ‖ model) held out | KL / estimate |\n"
          "|---|---|---|---|---|")
    for u in allocation.units:
        if label not in u.distortion or (only is not None and units[u.name].layer not in only):
            continue
        swapper.apply(allocation, {u.name: label})
        kl = kl_to_reference(model, held, reference)
        swapper.restore()
        scaled = u.distortion[label]
        unit = units[u.name]
        est = scaled / unit_scale(measured, unit, unit_cost(unit, setting, codec) / unit.num_weights)
        rows.append((u.name, est, kl, scaled))
        print(f"| {u.name} | {est:.4g} | {scaled:.4g} | {kl:.5f} | {kl / max(est, 1e-30):.3g} |", flush=True)
    kls = [r[2] for r in rows]
    print(f"\nSpearman rho against the measured KL over {len(rows)} matrices: estimate "
          f"{spearman([r[1] for r in rows], kls):.3f}, measured damage {spearman([r[3] for r in rows], kls):.3f}")
    if layer_alone:
        alone = [est * layer_alone.get(units[name].layer, 1.0) for name, est, _, _ in rows]
        print(f"measured damage with layer scales alone (no type scales): rho {spearman(alone, kls):.3f}")
    kinds: dict[str, list[float]] = {}
    for name, est, kl, _ in rows:
        kinds.setdefault(name.split(".")[-1], []).append(kl / max(est, 1e-30))
    print("median measured / estimated by projection: " + ", ".join(
        f"{k} {torch.tensor(v).median().item():.3g}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
