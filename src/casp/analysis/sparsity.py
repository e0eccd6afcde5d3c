"""`casp sparsity`: attention density per layer and head; with a rank, the low-rank map error and our bound."""
from __future__ import annotations

from pathlib import Path

import torch

from casp.config import CompressionConfig
from casp.models.engine import walk_layers


def measure_sparsity(model: str | Path | None = None, config: CompressionConfig | None = None,
                     progress: bool = True) -> dict:
    """The report of `casp sparsity --json`."""
    from casp.analysis.attention_stats import layer_attention_stats
    from casp.pipeline import load_with_calibration
    from casp.steps.analyse import analyse, observe_layer
    from casp.steps.compress_layer import qk_pair
    from casp.steps.quantize import factorise
    from casp.steps.ranks import choose_ranks

    config = (config or CompressionConfig()).validate()
    torch.manual_seed(config.seed)
    source, model, _, adapter, batches, _ = load_with_calibration(model, config)
    geometry = adapter.attention_geometry(model)
    layers = adapter.decoder_layers(model)
    analysis = None
    if config.qk_rank == "auto":
        analysis = analyse(model, adapter, batches, density_mass=config.density_mass, keep_moments=False,
                           progress=progress)
    ranks = None
    if config.qk_rank and config.qk_rank != 0:
        ranks = choose_ranks(layers, adapter, config.qk_rank, config.qk_rank_overrides, analysis)
    rows = []
    for step in walk_layers(model, adapter, batches, desc="sparsity", progress=progress):
        groups = {"attn_in": adapter.linears["attn_in"]}
        step.outputs, moments, attn_inputs = observe_layer(step.layer, adapter, step.inputs, groups, config.device)
        lowrank = factorise(step.layer, adapter, ranks[step.index], moments.xtx["attn_in"]) if ranks else {}
        s = layer_attention_stats(step.layer, adapter, geometry, attn_inputs, config.density_mass,
                                  qk_pair(step.layer, adapter, lowrank))
        rows.append({"index": step.index, "rank_q": ranks[step.index]["q"] if ranks else 0,
                     "rank_k": ranks[step.index]["k"] if ranks else 0, **s.as_report()})
    return {
        "model": str(source),
        "definition": f"per head and query row, the fraction of visible keys holding {config.density_mass:.0%} "
                      "of the attention mass, averaged over rows",
        "mass": config.density_mass,
        "qk_rank": config.qk_rank,
        "calibration_tokens": sum(b["input_ids"].numel() for b in batches),
        "mean_density": sum(r["density"] for r in rows) / len(rows),
        "layers": rows,
    }
