"""Step: everything measured on the original model before allocation (ranks, units, damages, options)."""
from __future__ import annotations

import copy

from tqdm.auto import tqdm

from casp.config import CompressionConfig
from casp.data.calibration import first_batches
from casp.models.placement import off_cpu, on_device
from casp.models.streaming import InMemoryLayers
from casp.steps.analyse import analyse, analyse_layers
from casp.steps.joint import measure_qk_options
from casp.steps.measure import measure_distortions
from casp.steps.ranks import check_separate_qk, choose_ranks
from casp.steps.units import plan_units


def fisher_of(model, adapter, batches, source, progress, device="cpu"):
    """Output Fisher of every decoder linear: one backward pass, or layer by layer when the model is streamed
    or the work runs on a device (the model stays on the CPU)."""
    from casp.analysis.sensitivity import output_fisher, output_fisher_layerwise

    from casp.models.streaming import trim_heap

    if (source is not None and source.streamed) or off_cpu(device):
        return output_fisher_layerwise(model, adapter, batches, source or InMemoryLayers(), progress, device=device)
    fisher = output_fisher(model, adapter, batches, progress)
    trim_heap()   # the backward's activations are gone; give their heap back before the layer walks
    return fisher


# Calibration tokens the measuring walk uses (the sensitivity pass uses as many): candidate damages only rank
# settings and layers against each other, which XᵀX of 16k tokens does as well as of 64k, and the measuring
# walk then costs a quarter of the compression walk.
PLAN_TOKENS = 16384


def plan_ranks_and_units(model, adapter, batches, config: CompressionConfig, quantizer, transform, progress, cache=None,
                         source=None):
    """Everything measured on the original model: Q/K ranks, and the units with their distortions.

    The sensitivity and analysis passes run only when something needs them (rate-distortion
    allocation, auto ranks). Unless ranks are "auto" (they need every layer's spectrum first), each
    layer's units are measured while the analysis walk holds that layer, and its XᵀX is then dropped:
    one layer's second moments in memory at a time, and one pass over a streamed model. `cache` (a dict) lets runs that differ only in the target bits or
    the allocation rule share this work, e.g. in the demo and benchmarks.
    """
    measure = quantizer is not None and config.allocation == "rd"
    joint = config.qk_rank == "joint"
    database = {} if config.search_steps else None
    key = (repr(config.qk_rank), config.qk_rank_ladder, tuple(sorted(config.qk_rank_overrides.items())), measure, config.quantizer,
           repr(quantizer and quantizer.config), config.transform, repr(transform and transform.config),
           config.calib_samples, config.calib_seq_len, config.calib_jsonl, config.calib_text, config.seed,
           config.density_mass, config.layers, config.search_steps > 0, config.search_samples)
    if cache is not None and key in cache:
        ranks, units, qk_tables, database = cache[key]
        return ranks, copy.deepcopy(units), qk_tables, database
    layers = adapter.decoder_layers(model)
    auto = config.qk_rank == "auto"
    ranks = None if auto else choose_ranks(layers, adapter, 0 if joint else config.qk_rank, config.qk_rank_overrides)
    analysis = fisher = qk_tables = None
    if measure:
        fisher = fisher_of(model, adapter, batches, source, progress, config.device)
    if joint:
        check_separate_qk(layers, adapter, config.qk_rank)
    if auto:
        analysis = analyse(model, adapter, first_batches(batches, PLAN_TOKENS), density_mass=config.density_mass, keep_moments=measure,
                           device=config.device, progress=progress, source=source)
        ranks = choose_ranks(layers, adapter, config.qk_rank, config.qk_rank_overrides, analysis)
    units = plan_units(layers, adapter, ranks, config.layers)
    if measure:
        qk_tables = {} if joint else None
        if analysis is not None:
            _measure_after_analysis(layers, adapter, units, analysis, ranks, quantizer, fisher, config, transform,
                                    database, progress, source or InMemoryLayers())
        else:
            _measure_while_analysing(model, adapter, first_batches(batches, PLAN_TOKENS), config, quantizer, transform, progress, source, units,
                                     ranks, fisher, qk_tables, database)
    if cache is not None:
        cache[key] = (ranks, copy.deepcopy(units), qk_tables, database)
    return ranks, units, qk_tables, database


def _measure_while_analysing(model, adapter, batches, config, quantizer, transform, progress, source, units, ranks,
                             fisher, qk_tables, database) -> None:
    """One walk: per layer, its XᵀX, then its units' distortions (and Q/K options) while it is loaded."""
    for step, layer_analysis in analyse_layers(model, adapter, batches, density_mass=config.density_mass,
                                               keep_moments=True, device=config.device, progress=progress,
                                               source=source, attention=False):
        i, mine = step.index, [u for u in units if u.layer == step.index]
        one_layer, one_analysis = {i: step.layer}, {i: layer_analysis}
        measure_distortions(one_layer, adapter, mine, one_analysis, ranks, quantizer.candidates(), quantizer,
                            fisher, transform=transform, seed=config.seed, keep=database, progress=False,
                            device=config.device)
        if qk_tables is not None:
            qk_tables.update(measure_qk_options(one_layer, adapter, mine, one_analysis, fisher, quantizer,
                                                config.qk_rank_ladder, transform=transform, seed=config.seed,
                                                rank_multiple=quantizer.in_features_multiple, keep=database,
                                                progress=False, device=config.device))


def _measure_after_analysis(layers, adapter, units, analysis, ranks, quantizer, fisher, config, transform, database,
                            progress, source) -> None:
    """Auto ranks: each layer's units measured once every spectrum is known, the layer fetched again onto the device."""
    for i in tqdm(sorted({u.layer for u in units}), desc="measure", disable=not progress):
        source.fetch(i, layers[i])
        with on_device(layers[i], config.device):
            measure_distortions({i: layers[i]}, adapter, [u for u in units if u.layer == i], analysis, ranks,
                                quantizer.candidates(), quantizer, fisher, transform=transform, seed=config.seed,
                                keep=database, progress=False, device=config.device)
        source.release(i, layers[i])
