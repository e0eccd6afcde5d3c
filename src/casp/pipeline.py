"""One compression run, top to bottom.

resolve the recipe -> load (whole, or only the non-layer parts when streaming) -> check the budget from
the shapes -> calibrate -> plan (Q/K ranks, units, each unit's damage at each candidate, joint Q/K
options) -> allocate bits (optionally searched by held-out KL) -> compress layer by layer (low-rank Q/K,
transform, quantizer; optionally each layer tuned to its original output; a streamed run writes each layer as
it finishes and can resume) -> baseline check (the allocated model against the uniform setting on held-out
samples; the better is kept) -> optionally the whole model distilled into the original's outputs -> report -> save.
Each step is a function in `casp.steps` that takes the run and its data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from casp.codec import Codec
from casp.config import CompressionConfig
from casp.data.calibration import hold_out
from casp.models.engine import peak_device_mb, peak_rss_mb, walk_layers
from casp.recipe import Recipe, resolve
from casp.run import Run, RunOptions, open_writer
from casp.steps import baseline_check, distill
from casp.steps.allocation import allocate, allocate_joint, check_feasible, decode, solve, uniform_choice
from casp.steps.compress_layer import compress_layer
from casp.steps.load import calibrate, load_parts
from casp.steps.plan import plan_ranks_and_units, plan_summary
from casp.steps.ranks import check_separate_qk
from casp.steps.search import search
from casp.steps.units import Plan, plan_state, plan_units, restore_plan_state, with_hints


@dataclass
class CompressionResult:
    model: nn.Module | None
    processor: object
    source: Path
    report: dict
    config: Recipe            # the recipe the run carried out
    out: Path | None = None

    @property
    def recipe(self) -> Recipe:
        return self.config


def compress(model: str | Path | nn.Module | None = None, out: str | Path | None = None,
             config: CompressionConfig | Recipe | None = None, *, processor=None, progress: bool = True,
             options: RunOptions | None = None) -> CompressionResult:
    """Compress a model with CASP; write it to `out` when given. Returns the model, report and recipe.

    `config` is what the user asked for (resolved here) or a `Recipe` (run as it is). A streamed run
    (`casp.io.stream_writer`) returns the report and `out`, and `model` is None.
    """
    options = options or RunOptions()
    recipe = config if isinstance(config, Recipe) else resolve(config, model, out=out, resume=options.resume)
    if out is not None:
        from casp.io.storage import check_output_dir

        check_output_dir(Path(out), options.overwrite)
    writer = open_writer(recipe, out, options)
    try:
        run, batches = start(model, recipe, writer, processor, progress, options.cache)
        return carry_out(run, batches)
    except BaseException:
        writer.abandon()
        raise


def start(model, recipe: Recipe, writer, processor, progress: bool, cache):
    """The run (model loaded, its budget checked from the shapes) and its calibration batches."""
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    source, loaded, processor, adapter, layer_source = load_parts(model, recipe, processor, writer.spill_dir)
    run = Run(recipe, Codec.of(recipe), loaded, processor, adapter, source, layer_source, writer, progress, cache)
    run.times["start"] = t0
    check_separate_qk(run.layers, adapter, recipe.qk_rank, recipe.qk_rank_overrides)
    if run.codec is not None and recipe.allocation != "uniform" and recipe.qk_rank != "auto":
        check_feasible(run)
    return run, calibrate(run)


def carry_out(run: Run, batches: list[dict]) -> CompressionResult:
    """Plan (or read back the plan of a resumed run), compress every layer, report and save."""
    recipe = run.recipe
    spared = max(recipe.search_samples if recipe.search_steps else 0, recipe.check_samples)
    batches, held = hold_out(batches, spared) if spared else (batches, [])
    run.times["plan"] = time.time()
    saved = run.writer.saved_plan()
    if saved is None:
        plan = plan_and_allocate(run, batches, held)
        run.writer.save_plan(plan_state(plan))
    else:
        plan = restore_plan_state(saved, run.codec and run.codec.setting_type())
    run.times["teacher"] = time.time()
    teacher = distill.prepare(run, batches) if recipe.e2e_steps else None
    run.times["layers"] = time.time()
    run.check = baseline_check.prepare(run, held, plan.units) if recipe.check_samples else None
    run.reference = None   # the check holds its own; nothing else needs the original's log-probabilities
    compress_layers(run, batches, plan)
    checked = baseline_check.decide(run, run.check) if run.check is not None else None
    run.times["e2e"] = time.time()
    e2e = distill.distill(run, teacher) if teacher is not None else None
    report = build_report(run, batches, plan)
    baseline_check.add_to_report(report, checked, recipe.check_samples)
    if e2e is not None:
        report["e2e"] = e2e
    result = CompressionResult(run.model, run.processor, run.source, report, run.recipe)
    result.out = run.writer.finish(result, run.layer_source)
    if run.recipe.stream:
        result.model = None
    return result


def plan_and_allocate(run: Run, batches: list[dict], held: list[dict]) -> Plan:
    """Q/K ranks, units and each unit's setting: measured on the original model, then allocated."""
    recipe, codec = run.recipe, run.codec
    measured = plan_ranks_and_units(run, batches, held)
    plan = Plan(measured.ranks, measured.units, {}, plan_summary(measured))
    if measured.qk_tables is not None or recipe.search_steps:
        if measured.qk_tables is not None:
            solution = allocate_joint(run, measured.units, measured.qk_tables)
            plan.summary["joint_allocation"] = solution.summary
        else:
            solution = solve(run, measured.units, rule="rd")
        if recipe.search_steps:
            starts = {**solution.alternatives, "uniform": uniform_choice(solution, codec, recipe.bits)}
            plan.summary["search"] = search(run, solution, measured.database, held, starts)
        plan.ranks, plan.settings = decode(solution, measured.units, codec, measured.qk_tables or {},
                                           len(run.layers))
        plan.units = with_hints(plan_units(run.layers, run.adapter, plan.ranks, recipe.layers), measured.units)
    elif codec is not None:
        plan.settings = allocate(run, measured.units)
    return plan


def compress_layers(run: Run, batches: list[dict], plan: Plan) -> None:
    """The layer pass: each decoder layer compressed in turn, handed to the writer as it finishes."""
    last = len(run.layers) - 1
    start_at, hidden = run.writer.resume_point(len(run.layers))
    rows = {}

    def layer_done(i, layer, inputs):
        next_inputs = (lambda: inputs.hidden.fp16()) if i < last else None
        run.writer.layer_done(i, layer, run.prefix(i), rows.get(i), next_inputs)

    for step in walk_layers(run.model, run.adapter, batches, device=run.device, only=run.recipe.layers,
                            desc="compress", progress=run.progress, source=run.layer_source, start=start_at,
                            hidden=hidden, on_done=layer_done):
        if run.recipe.stream:
            torch.manual_seed(run.seed + step.index)
        rows[step.index] = compress_layer(run, step, plan)


def build_report(run: Run, batches: list[dict], plan: Plan) -> dict:
    """The run's report: the recipe, bits, per-layer decisions, timings and memory."""
    from casp.report import build_report as report_of

    now, times = time.time(), run.times
    report = report_of(
        recipe=run.recipe, source=run.source, adapter=run.adapter, layer_reports=run.writer.layer_rows(),
        seconds=now - times["start"], peak_rss_mb=peak_rss_mb(), peak_device_mb=peak_device_mb(run.device),
        calibration_batches=len(batches), calibration_tokens=sum(b["input_ids"].numel() for b in batches),
    )
    report.update(plan.summary)
    report["phase_seconds"] = {"load_and_calibrate": times["plan"] - times["start"],
                               "plan_and_allocate": times["teacher"] - times["plan"],
                               "compress_layers": times["e2e"] - times["layers"],
                               "e2e": now - times["e2e"] + times["layers"] - times["teacher"]}
    return report
