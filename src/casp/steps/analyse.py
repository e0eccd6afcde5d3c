"""Step: one pass over the original layers: XᵀX per input group, attention density, whitened Q/K spectra."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.algorithms.lowrank import whitened_singular_values
from casp.analysis.attention_stats import LayerAttentionStats, layer_attention_stats
from casp.models.adapters import Adapter
from casp.models.engine import SecondMoments, record_attention_inputs, record_second_moments, run_layer, walk_layers

QK = ("q", "k")


@dataclass
class LayerAnalysis:
    """What the original decoder layer showed on the calibration data."""

    attention: LayerAttentionStats | None            # None when not asked for
    spectra: dict[str, torch.Tensor]                 # "q"/"k" -> whitened singular values (with attention)
    moments: dict[str, torch.Tensor] | None = None   # input group -> XᵀX (float32), when kept


def observe_layer(layer, adapter: Adapter, inputs, groups, device):
    """Run a layer once on its inputs; return its outputs, XᵀX of `groups`, and its attention inputs."""
    moments, attn_inputs = SecondMoments(), []
    with record_second_moments(layer, groups, moments), record_attention_inputs(layer, adapter, attn_inputs):
        outs = run_layer(layer, inputs, device)
    return outs, moments, attn_inputs


def analyse_layers(run, batches, *, keep_moments: bool, attention: bool = True):
    """Yield (layer step, `LayerAnalysis`) per decoder layer of the run's original model, while the layer is loaded.

    The layer and its kept XᵀX are on the run's device while yielded; spectra are on the CPU.
    `attention=False` skips the attention density and Q/K spectra (only rank choices need them).
    """
    adapter, device = run.adapter, run.device
    for step in walk_layers(run.model, adapter, batches, device=device, desc="analyse", progress=run.progress,
                            source=run.layer_source):
        step.outputs, moments, attn_inputs = observe_layer(step.layer, adapter, step.inputs, adapter.linears, device)
        stats, spectra = None, {}
        if attention:
            stats = layer_attention_stats(step.layer, adapter, run.geometry, attn_inputs, mass=run.recipe.density_mass)
            h = moments.xtx["attn_in"]
            spectra = {p: whitened_singular_values(step.layer.get_submodule(adapter.qk_name(p)).weight.data, h).cpu()
                       for p in QK}
        kept = {k: v.float() for k, v in moments.xtx.items()} if keep_moments else None
        del attn_inputs, moments   # the float64 sums are not held while the caller measures the layer
        yield step, LayerAnalysis(stats, spectra, kept)


def analyse(run, batches, *, keep_moments: bool) -> list[LayerAnalysis]:
    """A `LayerAnalysis` per decoder layer of the run's original model, kept XᵀX on the CPU."""
    out = []
    for _, a in analyse_layers(run, batches, keep_moments=keep_moments):
        if a.moments is not None:
            a.moments = {k: v.cpu() for k, v in a.moments.items()}
        out.append(a)
    return out
