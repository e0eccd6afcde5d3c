"""Step (--damage measured): each decoder layer's estimated damages scaled to the KL the layer causes, measured.

The rd allocator weighs settings by a per-matrix estimate, the output-Fisher-weighted quadratic error. It is
a local model of KL: it ranks the settings of one matrix well, but its scale from layer to layer does not
transfer between models (on Gemma-3-270M, KL per unit of estimate differs 130-fold between layers at 2 bits;
docs/allocation.md). So while the plan measures a layer, its dense matrices are also quantized whole at each
probe setting, on the same inputs. Afterwards each layer in turn is put at each probe (every other layer
original), and KL(FP ‖ model) on the held-out calibration samples is measured, the model run from that layer on
the original's kept inputs (`casp.steps.held_out`: on average half the stack). KL over the layer's summed
estimate at the probe is the layer's scale at the probe's bits per weight; every damage of the layer (each
candidate, each Q/K option) is multiplied by its scale, interpolated log-linearly in bits between probes and
held constant beyond them. Scaling a layer's estimate by any constant leaves the scaled damages unchanged.

A few held-out samples measure each layer's KL with noise. Where the layers' scales differ by no more than
that noise (the embedded model, whose KLs are near 1e-4), trusting them would only reshuffle the estimate's
ranking at random; so the log-scales are pulled toward their mean by the share of their spread that exceeds
the layer × sample noise (`casp.algorithms.shrinkage`), and that share is reported as `layer_scale_trust`.

`--damage measured-types` adds a scale per projection type. One scale per layer is set by the projections that
carry most of the layer's estimate, and within a layer the estimate's bias differs by projection type (on
Gemma-3-270M the KL over the estimate of single matrices spreads 9.4-fold between two types). So
every matrix of a type, in all layers, is put at its probe weights at once (the layer probes' own: no new
quantization), against the KL the layer-scaled estimate predicts for them. Those ratios, shrunk the same way
(`type_scale_trust`) and centred, are `type_scales`; the layer scales are then fitted again on the type-scaled
estimate, so each layer still predicts its own measured KL. Per matrix this ranks better than the layer scales
alone on the three models measured; end to end it helped Gemma-3-270M and hurt SmolLM2-135M, so it is not the
default (docs/allocation.md).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from casp.algorithms.shrinkage import shrink_layer_effects
from casp.steps.costs import unit_cost
from casp.steps.measure import is_probed, probe_settings
from casp.steps.held_out import HeldOut, held_out
from casp.steps.search import WeightSwapper
from casp.steps.units import Unit


@torch.no_grad()
def measure_layer_scales(run, measured, held: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """layer -> [(bits per weight, scale)] by increasing bits, from `measured.probes` ((unit key, label) ->
    fp16 weight); layers without a probe are left out. Sets `measured.scale_trust` (probe label -> the
    shrinkage factor kept, `shrink_scales`), and `measured.type_scales` / `type_trust` (empty unless
    `--damage measured-types`)."""
    codec = run.codec
    by_layer: dict[int, list[Unit]] = {}
    for u in measured.units:
        if is_probed(u):
            by_layer.setdefault(u.layer, []).append(u)
    probe_rows = held_out(run, held)
    found: dict[str, dict[int, tuple[float, list[tuple[float, int]], float]]] = {}
    for i in tqdm(sorted(by_layer), desc="probe layers", disable=not run.progress):
        units = by_layer[i]
        for s in probe_settings(codec):
            label = s.label()
            if any((u.key, label) not in measured.probes for u in units):
                continue
            kls = _kl_with(run, units, label, measured.probes, probe_rows)
            estimate = sum(u.distortion[label] for u in units)
            bits = sum(unit_cost(u, s, codec) for u in units) / sum(u.num_weights for u in units)
            found.setdefault(label, {})[i] = (bits, kls, estimate)
    scales: dict[int, list[tuple[float, float]]] = {}
    measured.scale_trust, measured.type_trust, type_logs = {}, {}, {}
    for label, per_layer in found.items():
        type_rows = _type_rows(run, {i: by_layer[i] for i in per_layer}, label, measured, probe_rows) \
            if run.recipe.damage == "measured-types" else {}
        types: dict[str, float] = {}
        shrunk, measured.scale_trust[label] = _fit_layers(per_layer, by_layer, label, types)
        for _ in range(FIT_ROUNDS if type_rows else 0):
            types, measured.type_trust[label] = _fit_types(type_rows, label, shrunk)
            shrunk, measured.scale_trust[label] = _fit_layers(per_layer, by_layer, label, types)
        for module, f in types.items():
            type_logs.setdefault(module, []).append(math.log(f))
        for i, scale in shrunk.items():
            scales.setdefault(i, []).append((per_layer[i][0], scale))
    measured.type_scales = {m: math.exp(sum(v) / len(v)) for m, v in sorted(type_logs.items())}
    return {i: sorted(points) for i, points in sorted(scales.items())}


FIT_ROUNDS = 5   # alternations of layer and type fits; each reuses the KLs measured once


def _type_rows(run, by_layer: dict[int, list[Unit]], label: str, measured,
               held: HeldOut) -> dict[str, tuple[list[Unit], list[tuple[float, int]]]]:
    """Projection type -> (its probed units in `by_layer`, held-out KL rows with all of them at their probe weights
    at once); empty with fewer than two types."""
    by_type: dict[str, list[Unit]] = {}
    for units in by_layer.values():
        for u in units:
            by_type.setdefault(u.module, []).append(u)
    if len(by_type) < 2:
        return {}
    return {m: (units, _kl_with(run, units, label, measured.probes, held))
            for m, units in tqdm(sorted(by_type.items()), desc="probe projections", disable=not run.progress)}


def _fit_layers(per_layer: dict, by_layer: dict[int, list[Unit]], label: str, types: dict[str, float]):
    """The layers' shrunk scales over the type-scaled estimate, and the share of their spread kept."""
    return shrink_scales({i: (bits, rows, sum(types.get(u.module, 1.0) * u.distortion[label] for u in by_layer[i]))
                          for i, (bits, rows, _) in per_layer.items()})


def _fit_types(type_rows: dict, label: str, layer_scale: dict[int, float]) -> tuple[dict[str, float], float]:
    """Projection type -> its factor (geometric mean 1): measured KL over what the layer-scaled estimate predicts,
    shrunk by sample noise; and the share of the types' spread kept."""
    per_type = {}
    for module, (units, rows) in type_rows.items():
        predicted = sum(layer_scale[u.layer] * u.distortion[label] for u in units)
        if predicted > 0:
            per_type[module] = (0.0, rows, predicted)
    if len(per_type) < 2:
        return {}, 1.0
    shrunk, factor = shrink_scales(per_type)
    centre = sum(math.log(max(v, _FLOOR)) for v in shrunk.values()) / len(shrunk)
    return {m: math.exp(math.log(max(v, _FLOOR)) - centre) for m, v in shrunk.items()}, factor


def shrink_scales(per_layer: dict[int, tuple[float, list[tuple[float, int]], float]]) -> tuple[dict[int, float], float]:
    """Each layer's scale at one probe (held-out KL over estimate), its log pulled toward the layers' mean log
    by the share of the layers' spread that is not sample noise (`casp.algorithms.shrinkage`); returns the
    scales and that share. Layers with a zero estimate get scale 1 and take no part."""
    raw, ratios = {}, {}
    for i, (_, rows, estimate) in per_layer.items():
        if estimate <= 0:
            raw[i] = 1.0
            continue
        kl = sum(t for t, _ in rows) / max(sum(c for _, c in rows), 1)
        raw[i] = max(kl, 0.0) / estimate
        ratios[i] = [math.log(max(t / max(c, 1), _FLOOR) / estimate) for t, c in rows]
    if len(ratios) < 2:
        return raw, 1.0
    _, factor = shrink_layer_effects(torch.tensor([ratios[i] for i in ratios]))
    logs = {i: math.log(max(raw[i], _FLOOR)) for i in ratios}
    centre = sum(logs.values()) / len(logs)
    return {**raw, **{i: math.exp(centre + factor * (v - centre)) for i, v in logs.items()}}, factor


_FLOOR = 1e-12   # KL below this is taken as this, so every log is finite


def _kl_with(run, units: list[Unit], label: str, probes: dict, held: HeldOut) -> list[tuple[float, int]]:
    """Each held-out row's (summed KL, tokens) with `units` at their probe weights (restored after); the model runs
    from the lowest layer among them (`HeldOut.kl_rows`)."""
    swapper = WeightSwapper(run.layers, probes)
    swapper.put((u.key, label) for u in units)
    try:
        return held.kl_rows(run, min(u.layer for u in units))
    finally:
        swapper.restore()


def scale_at(points: list[tuple[float, float]], bits: float) -> float:
    """The scale at `bits` per weight: log-linear between probes, the nearest probe's beyond them."""
    if bits <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if bits <= x1:
            t = (bits - x0) / (x1 - x0) if x1 > x0 else 1.0
            return math.exp((1 - t) * math.log(max(y0, 1e-12)) + t * math.log(max(y1, 1e-12)))
    return points[-1][1]


def apply_layer_scales(measured, codec) -> None:
    """Scale every unit's damages and Q/K options by their layer's scale at their bits and their projection type's
    (tables copied, not changed in place: a plan cache may share them)."""
    scales = measured.layer_scales
    by_label = {s.label(): s for s in codec.candidates()}
    for u in measured.units:
        if u.layer in scales:
            u.distortion = {label: d * unit_scale(measured, u, unit_cost(u, by_label[label], codec) / u.num_weights)
                            for label, d in u.distortion.items()}
    if measured.qk_tables:
        units = {u.key: u for u in measured.units}
        tables = {}
        for key, table in measured.qk_tables.items():
            u = units[key]
            tables[key] = table if key.layer not in scales else {
                label: (o, cost, d * unit_scale(measured, u, unit_cost(u, o.setting, codec) / u.num_weights))
                for label, (o, cost, d) in table.items()}
        measured.qk_tables = tables


def unit_scale(measured, unit: Unit, bits: float) -> float:
    """What `apply_layer_scales` multiplies `unit`'s damage at `bits` per weight by: its layer's scale at those
    bits times its projection type's (1 where none was measured)."""
    points = measured.layer_scales.get(unit.layer)
    if points is None:
        return 1.0
    return (measured.type_scales or {}).get(unit.module, 1.0) * scale_at(points, bits)


def summary(measured) -> dict:
    """The report's record of the scales (layer -> [[bits per weight, scale], ...]), empty without them."""
    if measured.layer_scales is None:
        return {}
    return {"layer_scales": {str(i): [[round(b, 4), s] for b, s in points] for i, points in measured.layer_scales.items()},
            "layer_scale_trust": dict(measured.scale_trust or {}),
            "type_scales": dict(measured.type_scales or {}), "type_scale_trust": dict(measured.type_trust or {})}
