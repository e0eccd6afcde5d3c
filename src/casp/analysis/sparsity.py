"""`casp sparsity`: attention density per layer and head; with a rank, the low-rank map error and our bound."""
from __future__ import annotations

from pathlib import Path

from casp.config import CompressionConfig
from casp.models.engine import walk_layers


def measure_sparsity(model: str | Path | None = None, config: CompressionConfig | None = None,
                     progress: bool = True) -> dict:
    """The report of `casp sparsity --json`."""
    from dataclasses import replace

    from casp.analysis.attention_stats import layer_attention_stats
    from casp.io.memory_writer import MemoryWriter
    from casp.pipeline import start
    from casp.recipe import resolve
    from casp.steps.analyse import analyse, observe_layer
    from casp.steps.compress_layer import qk_pair
    from casp.steps.quantize import factorise
    from casp.steps.ranks import choose_ranks

    recipe = resolve(replace(config or CompressionConfig(qk_rank=0.25), quantizer="none", quantizer_options={}), model)
    run, batches = start(model, recipe, MemoryWriter(None, overwrite=False), None, progress, None)
    source, model, adapter, geometry, layers = run.source, run.model, run.adapter, run.geometry, run.layers
    analysis = None
    if recipe.qk_rank == "auto":
        analysis = analyse(run, batches, keep_moments=False)
    ranks = None
    if recipe.qk_rank and recipe.qk_rank != 0:
        ranks = choose_ranks(layers, adapter, recipe.qk_rank, recipe.qk_rank_overrides, analysis)
    rows = []
    for step in walk_layers(model, adapter, batches, desc="sparsity", progress=progress):
        groups = {"attn_in": adapter.linears["attn_in"]}
        step.outputs, moments, attn_inputs = observe_layer(step.layer, adapter, step.inputs, groups, recipe.device)
        lowrank = factorise(step.layer, adapter, ranks[step.index], moments.xtx["attn_in"]) if ranks else {}
        s = layer_attention_stats(step.layer, adapter, geometry, attn_inputs, recipe.density_mass,
                                  qk_pair(step.layer, adapter, lowrank))
        rows.append({"index": step.index, "rank_q": ranks[step.index]["q"] if ranks else 0,
                     "rank_k": ranks[step.index]["k"] if ranks else 0, **s.as_report()})
    return {
        "model": str(source),
        "definition": f"per head and query row, the fraction of visible keys holding {recipe.density_mass:.0%} "
                      "of the attention mass, averaged over rows",
        "mass": recipe.density_mass,
        "qk_rank": recipe.qk_rank,
        "calibration_tokens": sum(b["input_ids"].numel() for b in batches),
        "mean_density": sum(r["density"] for r in rows) / len(rows),
        "layers": rows,
    }
