"""Step: everything measured on the original model before allocation (ranks, units, damages, options)."""
from __future__ import annotations

import copy
import logging
import time

from tqdm.auto import tqdm

from casp.data.calibration import first_batches
from casp.io.plan_cache import plan_key
from casp.models.placement import off_cpu, on_device
from casp.steps.analyse import analyse, analyse_layers
from casp.steps.joint import measure_qk_options
from casp.steps import layer_scales
from casp.steps.layer_scales import apply_layer_scales, measure_layer_scales
from casp.steps.measure import measure_distortions
from casp.steps.measured import Measured
from casp.steps.ranks import check_separate_qk, choose_ranks
from casp.steps.units import plan_units

# Calibration tokens the measuring walk uses (the sensitivity pass reads `Recipe.fisher_tokens`: as many, or half
# for E8 under incoherence): candidate damages only rank settings and layers against each other, which XᵀX of 16k
# tokens does as well as of 64k, and the measuring walk then costs a quarter of the compression walk.
PLAN_TOKENS = 16384

logger = logging.getLogger(__name__)


def fisher_of(run, batches):
    """Output Fisher of every decoder linear: one backward pass, or layer by layer when the model is streamed
    or the work runs on a device (the model stays on the CPU)."""
    from casp.analysis.sensitivity import output_fisher, output_fisher_layerwise
    from casp.models.streaming import trim_heap

    if run.layer_source.streamed or off_cpu(run.device):
        return output_fisher_layerwise(run.model, run.adapter, batches, run.layer_source, run.progress,
                                       max_tokens=run.recipe.fisher_tokens, device=run.device,
                                       labels=run.recipe.fisher, seed=run.seed)
    fisher = output_fisher(run.model, run.adapter, batches, run.progress, max_tokens=run.recipe.fisher_tokens,
                           labels=run.recipe.fisher, seed=run.seed)
    trim_heap()   # the backward's activations are gone; give their heap back before the layer walks
    return fisher


def plan_ranks_and_units(run, batches, held: list[dict] = ()) -> Measured:
    """Everything measured on the original model: Q/K ranks, and the units with their distortions.

    The sensitivity and analysis passes run only when something needs them (rate-distortion
    allocation, auto ranks). Unless ranks are "auto" (they need every layer's spectrum first), each
    layer's units are measured while the analysis walk holds that layer, and its XᵀX is then dropped:
    one layer's second moments in memory at a time, and one pass over a streamed model. The run's
    cache (a dict, or `casp.io.plan_cache.PlanCache` on disk) lets runs with the same `plan_key` share this work.
    With measured damage (`casp.steps.layer_scales`), each layer's damages are then scaled to the KL it
    causes on the `held` samples.
    """
    recipe = run.recipe
    key = plan_key(run)
    if run.cache is not None and key in run.cache:
        logger.info("measured plan reused from the plan cache")
        return _units_copied(run.cache[key])
    measure = run.codec is not None and recipe.allocation == "rd"
    joint, auto = recipe.qk_rank == "joint", recipe.qk_rank == "auto"
    ranks = None if auto else choose_ranks(run.layers, run.adapter, 0 if joint else recipe.qk_rank,
                                           recipe.qk_rank_overrides)
    measured = Measured(ranks, [], database={} if recipe.search_steps else None)
    scaled = measure and recipe.damage in ("measured", "measured-types") and bool(held)
    measured.probes = {} if scaled else None
    clock = _Clock()
    if measure:
        measured.fisher = fisher_of(run, batches)
        clock.lap("fisher")
    if joint:
        check_separate_qk(run.layers, run.adapter, recipe.qk_rank)
    analysis = None
    if auto:
        analysis = analyse(run, first_batches(batches, PLAN_TOKENS), keep_moments=measure)
        measured.ranks = choose_ranks(run.layers, run.adapter, recipe.qk_rank, recipe.qk_rank_overrides, analysis)
    measured.units = plan_units(run.layers, run.adapter, measured.ranks, recipe.layers)
    if measure:
        measured.qk_tables = {} if joint else None
        if analysis is not None:
            _measure_after_analysis(run, measured, analysis)
        else:
            _measure_while_analysing(run, first_batches(batches, PLAN_TOKENS), measured)
        clock.lap("measure")
    if scaled:
        measured.layer_scales = measure_layer_scales(run, measured, list(held))
        measured.probes = None
        apply_layer_scales(measured, run.codec)
        clock.lap("layer_probes")
    measured.seconds = clock.laps
    if run.cache is not None:
        run.cache[key] = _units_copied(measured)
    return measured


def plan_summary(measured: Measured) -> dict:
    """The report's record of the measuring: the layer scales, and the seconds of its parts when this run measured."""
    return {**layer_scales.summary(measured), **({"plan_seconds": measured.seconds} if measured.seconds else {})}


class _Clock:
    """Seconds of the measuring's parts: `lap(name)` records the time since the previous lap (or the start)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.laps[name] = now - self.last
        self.last = now


def _units_copied(measured: Measured) -> Measured:
    """A `Measured` whose units a run may change (allocation writes to them); the tables are shared."""
    return Measured(measured.ranks, copy.deepcopy(measured.units), measured.fisher, measured.qk_tables,
                    measured.database, measured.layer_scales, scale_trust=measured.scale_trust,
                    type_scales=measured.type_scales, type_trust=measured.type_trust)


def _measure_while_analysing(run, batches, measured: Measured) -> None:
    """One walk: per layer, its XᵀX, then its units' distortions (and Q/K options) while it is loaded."""
    for step, layer_analysis in analyse_layers(run, batches, keep_moments=True, attention=False):
        one_layer, one_analysis = {step.index: step.layer}, {step.index: layer_analysis}
        measure_distortions(run, measured, one_layer, one_analysis)
        if measured.qk_tables is not None:
            measured.qk_tables.update(measure_qk_options(run, measured, one_layer, one_analysis))


def _measure_after_analysis(run, measured: Measured, analysis) -> None:
    """Auto ranks: each layer's units measured once every spectrum is known, the layer fetched again onto the device."""
    layers, source = run.layers, run.layer_source
    for i in tqdm(sorted({u.layer for u in measured.units}), desc="measure", disable=not run.progress):
        source.fetch(i, layers[i])
        with on_device(layers[i], run.device):
            measure_distortions(run, measured, {i: layers[i]}, analysis)
        source.release(i, layers[i])
