"""Step: everything measured on the original model before allocation (ranks, units, damages, options)."""
from __future__ import annotations

import copy

from casp.config import CompressionConfig
from casp.steps.analyse import analyse
from casp.steps.joint import measure_qk_options
from casp.steps.measure import measure_distortions
from casp.steps.ranks import check_separate_qk, choose_ranks
from casp.steps.units import plan_units


def plan_ranks_and_units(model, adapter, batches, config: CompressionConfig, quantizer, transform, progress, cache=None):
    """Everything measured on the original model: Q/K ranks, and the units with their distortions.

    The sensitivity and analysis passes run only when something needs them (rate-distortion
    allocation, auto ranks). `cache` (a dict) lets runs that differ only in the target bits or
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
    analysis = fisher = None
    if measure:
        from casp.analysis.sensitivity import output_fisher

        fisher = output_fisher(model, adapter, batches, progress)
    if measure or auto:
        analysis = analyse(model, adapter, batches, density_mass=config.density_mass, keep_moments=measure,
                           progress=progress)
        ranks = ranks or choose_ranks(layers, adapter, config.qk_rank, config.qk_rank_overrides, analysis)
    units = plan_units(layers, adapter, ranks, config.layers)
    if measure:
        measure_distortions(layers, adapter, units, analysis, ranks, quantizer.candidates(), quantizer, fisher,
                            transform=transform, seed=config.seed, keep=database, progress=progress)
    qk_tables = None
    if joint:
        check_separate_qk(layers, adapter, config.qk_rank)
        qk_tables = measure_qk_options(layers, adapter, units, analysis, fisher, quantizer, config.qk_rank_ladder,
                                       transform=transform, seed=config.seed,
                                       rank_multiple=quantizer.in_features_multiple, keep=database,
                                       progress=progress)
    if cache is not None:
        cache[key] = (ranks, copy.deepcopy(units), qk_tables, database)
    return ranks, units, qk_tables, database
