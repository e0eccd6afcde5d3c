"""`casp sparsity`: attention density per layer and head; with a rank, the low-rank map error and our bound."""
from __future__ import annotations

from pathlib import Path

from casp.config import CompressionConfig
from casp.models.engine import walk_layers


def measure_sparsity(model: str | Path | None = None, config: CompressionConfig | None = None,
                     progress: bool = True) -> dict:
    """The report of `casp sparsity --json`."""
    from dataclasses import replace

    from casp.analysis.attention_stats import layer_attention_stats, layer_visual_density
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
    image_token = _image_token_id(model)
    visual = [b["input_ids"] == image_token for b in batches] if image_token is not None else None
    if visual is not None and not any(bool(v.any()) for v in visual):
        visual = None
    rows = []
    for step in walk_layers(model, adapter, batches, desc="sparsity", progress=progress):
        groups = {"attn_in": adapter.linears["attn_in"]}
        step.outputs, moments, attn_inputs = observe_layer(step.layer, adapter, step.inputs, groups, recipe.device)
        lowrank = factorise(step.layer, adapter, ranks[step.index], moments.xtx["attn_in"]) if ranks else {}
        s = layer_attention_stats(step.layer, adapter, geometry, attn_inputs, recipe.density_mass,
                                  qk_pair(step.layer, adapter, lowrank))
        row = {"index": step.index, "rank_q": ranks[step.index]["q"] if ranks else 0,
               "rank_k": ranks[step.index]["k"] if ranks else 0, **s.as_report()}
        if visual is not None:
            row.update(layer_visual_density(step.layer, adapter, attn_inputs, visual[:len(attn_inputs)],
                                            recipe.density_mass))
        rows.append(row)
    return {
        "model": str(source),
        "definition": f"per head and query row, the fraction of visible keys holding {recipe.density_mass:.0%} "
                      "of the attention mass, averaged over rows",
        "mass": recipe.density_mass,
        "qk_rank": recipe.qk_rank,
        "calibration_tokens": sum(b["input_ids"].numel() for b in batches),
        "mean_density": sum(r["density"] for r in rows) / len(rows),
        **({"visual_definition": "for text queries that see image and text keys: the density among image keys "
                                 "(of the mass given to them) against among text keys, and the mass share on image keys",
            "mean_visual_density": sum(r["visual_density"] for r in rows) / len(rows),
            "mean_text_density": sum(r["text_density"] for r in rows) / len(rows)} if visual is not None else {}),
        "layers": rows,
    }


def _image_token_id(model) -> int | None:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None
