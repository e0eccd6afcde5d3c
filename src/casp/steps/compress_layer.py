"""Step: compress one decoder layer in place: low-rank Q/K, every unit quantized (or kept fp16), then
optionally the stored tensors tuned to the original layer's output (`casp.steps.finetune`)."""
from __future__ import annotations

import time
from itertools import groupby

from casp.analysis.attention_stats import layer_attention_stats
from casp.models.adapters import Adapter
from casp.steps.analyse import observe_layer
from casp.steps.baseline_check import add_layer, layer_stored
from casp.steps.finetune import Tuning, finetune_layer
from casp.steps.quantize import FP16_BITS, factorise, stored_unit, unit_row, unit_weight_and_xtx
from casp.steps.units import Plan, Unit


def qk_pair(layer, adapter: Adapter, lowrank: dict):
    """(q module, k module) with the low-rank replacements; None when there are none."""
    if not lowrank:
        return None
    return tuple(lowrank.get(adapter.qk_name(p), layer.get_submodule(adapter.qk_name(p))) for p in ("q", "k"))


def compress_layer(run, step, plan: Plan) -> dict:
    """Replace the layer's linears by their stored modules; return the layer's report entry. With
    `--finetune-steps`, tune them (with `--finetune-within-layer` also after each input group, the
    matrices not yet quantized included) to the original outputs and leave the result's outputs in `step.outputs`."""
    t0 = time.time()
    layer, i, adapter, device = step.layer, step.index, run.adapter, run.device
    ranks = plan.ranks[i]
    original, moments, attn_inputs = observe_layer(layer, adapter, step.inputs, adapter.linears, device)
    recipe = run.recipe
    if not recipe.finetune_steps:
        original = None   # only tuning needs the original outputs: not held while the layer is quantized
    xtx = {k: v.to(device) for k, v in moments.xtx.items()}
    del moments   # its XᵀX live on in `xtx`, each dropped once its last unit is stored
    if run.check is not None:
        add_layer(run, layer, i, step.inputs, xtx, {u.key: plan.settings[u.key] for u in plan.units_of(i)})
    lowrank = factorise(layer, adapter, ranks, xtx["attn_in"])
    stats = layer_attention_stats(layer, adapter, run.geometry, attn_inputs, run.recipe.density_mass,
                                  qk_pair(layer, adapter, lowrank))
    for name, module in lowrank.items():
        layer.set_submodule(name, module)
    tuning = Tuning(recipe.finetune_steps, recipe.finetune_lr, device=device)
    groups = [list(g) for _, g in groupby(plan.units_of(i), key=lambda u: u.input_group)]
    stored, within = {}, 0.0   # unit name -> report row, in the layer's order
    for k, group in enumerate(groups):
        stored.update((u.name, _store_unit(run, layer, u, plan, (lowrank, xtx))) for u in group)
        if all(g[0].input_group != group[0].input_group for g in groups[k + 1:]):
            xtx.pop(group[0].input_group, None)
        if recipe.finetune_steps and recipe.finetune_within and k < len(groups) - 1:
            within += finetune_layer(layer, step.inputs, original, tuning).seconds
    if run.check is not None:
        layer_stored(run.check, layer, i, stored)
    entry = {"index": i, "rank_q": ranks.get("q", 0), "rank_k": ranks.get("k", 0), **stats.as_report(), "units": list(stored.values())}
    if recipe.finetune_steps:
        tuned = finetune_layer(layer, step.inputs, original, tuning)
        step.outputs = tuned.outputs
        entry["finetune"] = {**tuned.as_report(), "seconds": tuned.seconds + within}
    return {**entry, "seconds": time.time() - t0}


def _store_unit(run, layer, u: Unit, plan: Plan, factors_and_moments) -> dict:
    """Quantize one unit into its stored module inside `layer` (fp16 without a codec); its report row."""
    lowrank, xtx = factors_and_moments
    w, h = unit_weight_and_xtx(u, layer, lowrank, xtx)
    if run.codec is None:
        return {**unit_row(run, u), "setting": "fp16", "bits": FP16_BITS, "group_size": None,
                "stored_bits": w.numel() * FP16_BITS}
    target = layer.get_submodule(u.name)
    bias = target.bias.data.clone() if target.bias is not None else None
    module, row = stored_unit(run, u, w, h, plan.settings[u.key], bias)
    layer.set_submodule(u.name, module)
    return row
