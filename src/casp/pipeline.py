"""One compression run, top to bottom.

load (whole, or only the non-layer parts when streaming) -> check the budget from the shapes ->
calibrate -> plan (Q/K ranks, units, each unit's damage at each candidate, joint Q/K options) ->
allocate bits (optionally searched by held-out KL) -> compress layer by layer (low-rank Q/K,
transform, quantizer; a streamed run writes each layer as it finishes and can resume) -> report -> save.
Each step is a function in `casp.steps` that gets only what it needs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from casp.config import CompressionConfig
from casp.data.calibration import build_calibration, hold_out
from casp.errors import CaspError
from casp.io.modelio import is_compressed, load_model, load_processor, resolve_model_path
from casp.models.adapters import adapter_for
from casp.models.engine import peak_device_mb, peak_rss_mb, walk_layers
from casp.models.streaming import InMemoryLayers, load_streamed, too_big_for_memory
from casp.steps.allocation import allocate, allocate_joint, check_feasible, decode, solve, uniform_choice
from casp.steps.compress_layer import compress_layer
from casp.steps.plan import plan_ranks_and_units
from casp.steps.ranks import check_separate_qk
from casp.steps.search import search
from casp.steps.units import plan_state, plan_units, restore_plan_state

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    model: nn.Module
    processor: object
    source: Path
    report: dict
    config: CompressionConfig
    out: Path | None = None


def load_with_calibration(model, config: CompressionConfig, processor=None, before_calibration=None, spill_dir=None):
    """The (uncompressed) model, its processor, adapter, calibration batches and layer source.

    `model` is a local directory, a built-in name, None (the embedded model), or a model already
    in memory (then compressed in place; its processor is loaded from its `name_or_path` unless given).
    With `config.stream` only the non-layer parts are loaded; the layer source (`casp.models.streaming`)
    reads each decoder layer when the walk reaches it and spills activations into `spill_dir`.
    `before_calibration(model, adapter)` runs checks that need only the shapes, before any data work.
    """
    layer_source = InMemoryLayers()
    if isinstance(model, nn.Module):
        if config.stream:
            raise CaspError("--stream reads the model from its directory; it cannot compress a model in memory")
        loaded, source = model, Path(getattr(model.config, "_name_or_path", "") or ".")
        processor = processor if processor is not None else load_processor(source)
    else:
        source = resolve_model_path(model)
        if is_compressed(source):
            raise CaspError(f"{source} is already compressed by casp; use the original model")
        if config.stream:
            cap = None if config.max_memory is None else int(config.max_memory * 2**30)
            loaded, layer_source = load_streamed(source, max_bytes=cap, spill_dir=spill_dir)
        else:
            loaded = load_model(source)
        processor = processor if processor is not None else load_processor(source)
    adapter = adapter_for(loaded)
    if before_calibration is not None:
        before_calibration(loaded, adapter)
    held = config.search_samples if config.search_steps else 0
    batches = build_calibration(adapter, processor, source, n_samples=config.calib_samples + held,
                                seq_len=config.calib_seq_len, seed=config.seed, jsonl=config.calib_jsonl,
                                text_file=config.calib_text)
    return source, loaded, processor, adapter, batches, layer_source


def compress(model: str | Path | nn.Module | None = None, out: str | Path | None = None,
             config: CompressionConfig | None = None, *, processor=None, overwrite: bool = False,
             progress: bool = True, cache: dict | None = None) -> CompressionResult:
    """Compress a model with CASP; write it to `out` when given. Returns the in-memory model and report.

    With `config.stream` the model is read and written one decoder layer at a time (see
    `casp.io.stream_writer`); the result then holds the report and `out`, and `model` is None.
    """
    config = (config or CompressionConfig()).validate()
    quantizer, transform = config.build_quantizer(), config.build_transform()
    if out is not None:
        from casp.io.storage import check_output_dir

        check_output_dir(Path(out), overwrite)
    if not config.stream and out is not None and model_would_not_fit(model, config):
        log.info("the model does not fit in memory in float32: compressing it layer by layer (--stream)")
        config.stream = True
    if config.stream:
        if out is None:
            raise CaspError("--stream writes each layer as it finishes: it needs an output directory")
        from casp.io.stream_writer import StreamWriter

        writer = StreamWriter(out, config.to_dict(), resume=config.resume, overwrite=overwrite)
        try:
            return _compress(model, out, config, quantizer, transform, processor, overwrite, progress, cache, writer)
        except BaseException:
            writer.abandon()
            raise
    return _compress(model, out, config, quantizer, transform, processor, overwrite, progress, cache, None)


def _compress(model, out, config, quantizer, transform, processor, overwrite, progress, cache, writer):
    """The run itself; `writer` (streamed runs) receives each finished layer."""
    torch.manual_seed(config.seed)
    t_start = time.time()

    def feasible(model, adapter):
        check_separate_qk(adapter.decoder_layers(model), adapter, config.qk_rank, config.qk_rank_overrides)
        if quantizer is not None and config.allocation != "uniform" and config.qk_rank != "auto":
            check_feasible(adapter.decoder_layers(model), adapter, quantizer, config, transform)

    quantizer, excluded = without_source_grid(quantizer, model, config)
    quantizer, stand_in = for_builtin_text(quantizer, model, config)
    source, model, processor, adapter, batches, layer_source = load_with_calibration(
        model, config, processor, feasible, spill_dir=writer and writer.dir / "spill")
    held = []
    if config.search_steps:
        batches, held = hold_out(batches, config.search_samples)
    layers = adapter.decoder_layers(model)
    t_plan = time.time()
    saved = writer.saved_plan() if writer is not None else None
    if saved is None:
        ranks, units, plan, summary = plan_and_allocate(model, adapter, batches, held, config, quantizer, transform,
                                                        progress, cache, layer_source)
        if writer is not None:
            writer.save_plan(plan_state(ranks, units, plan, summary))
    else:
        ranks, units, plan, summary = restore_plan_state(saved, quantizer and type(quantizer.candidates()[0]))

    t_layers = time.time()
    geometry = adapter.attention_geometry(model)
    start, hidden = writer.resume_point(len(layers)) if writer is not None else (0, None)
    layer_reports = {}

    def layer_done(i, layer, inputs):
        if writer is not None:
            writer.layer_done(i, layer, f"{adapter.layers}.{i}.", layer_reports.get(i),
                              inputs.hidden.fp16() if i < len(layers) - 1 else None)

    for step in walk_layers(model, adapter, batches, device=config.device, only=config.layers, desc="compress",
                            progress=progress, source=layer_source, start=start, hidden=hidden, on_done=layer_done):
        if writer is not None:
            torch.manual_seed(config.seed + step.index)
        mine = [u for u in units if u.layer == step.index]
        layer_reports[step.index] = compress_layer(step, adapter, mine, ranks[step.index], plan, quantizer,
                                                   geometry=geometry, density_mass=config.density_mass,
                                                   device=config.device, transform=transform, seed=config.seed)
    if writer is not None:
        layer_reports = {r["index"]: r for r in writer.layer_rows()}

    from casp.report import build_report

    report = build_report(
        config=config, source=source, adapter=adapter, layer_reports=[layer_reports[i] for i in sorted(layer_reports)],
        seconds=time.time() - t_start, peak_rss_mb=peak_rss_mb(), peak_device_mb=peak_device_mb(config.device),
        calibration_batches=len(batches), calibration_tokens=sum(b["input_ids"].numel() for b in batches),
    )
    report.update(summary)
    report["phase_seconds"] = {"load_and_calibrate": t_plan - t_start, "plan_and_allocate": t_layers - t_plan,
                               "compress_layers": time.time() - t_layers}
    if excluded:
        report["excluded_candidates"] = excluded
    if stand_in:
        report["builtin_text_defaults"] = stand_in
    result = CompressionResult(model=model, processor=processor, source=source, report=report, config=config)
    if writer is not None:
        result.model = None
        result.out = writer.finish(layer_source.rest_tensors(), model.config, report, config, source)
    elif out is not None:
        from casp.io.storage import save_compressed

        result.out = save_compressed(result, Path(out), overwrite=overwrite)
    return result


def _model_path(model) -> Path:
    """The directory a model comes from (a model in memory: its `name_or_path`)."""
    if isinstance(model, nn.Module):
        return Path(getattr(model.config, "_name_or_path", "") or ".")
    return resolve_model_path(model)


def for_builtin_text(quantizer, model, config: CompressionConfig):
    """The quantizer with its defaults for calibration on casp's built-in text, when the run uses it.

    Returns (quantizer, the options applied or None, for the report). Options the user gave win.
    """
    from dataclasses import replace

    from casp.data.calibration import uses_builtin_text

    if quantizer is None or not uses_builtin_text(_model_path(model), config.calib_jsonl, config.calib_text):
        return quantizer, None
    options = {k: v for k, v in quantizer.builtin_text_options().items() if k not in config.quantizer_options}
    if not options:
        return quantizer, None
    return type(quantizer)(replace(quantizer.config, **options)), options


def without_source_grid(quantizer, model, config: CompressionConfig):
    """The quantizer less the candidates that reproduce the grid a built-in model's weights lie on.

    SmolLM2-135M ships Q4_1-dequantized weights: 4-bit grids with groups of 32 or less land on them
    exactly, so their measured damage is near zero and the allocator would pick them for that alone.
    Returns (quantizer, what was left out or None) for the report.
    """
    from dataclasses import fields, replace

    from casp.models.real_models import source_grid

    if quantizer is None or config.allocation == "uniform" or "source_grid" not in {f.name for f in fields(quantizer.config)}:
        return quantizer, None
    grid = source_grid(_model_path(model))
    if grid is None:
        return quantizer, None
    trimmed = type(quantizer)(replace(quantizer.config, source_grid=grid))
    kept = {s.label() for s in trimmed.candidates()}
    dropped = [s.label() for s in quantizer.candidates() if s.label() not in kept]
    if not dropped:
        return quantizer, None
    return trimmed, {"settings": dropped, "source_grid": {"bits": grid[0], "group_size": grid[1]},
                     "why": f"the weights were stored on a {grid[0]}-bit grid with groups of {grid[1]}; these settings "
                            "reproduce it and would measure almost no error"}


def model_would_not_fit(model, config: CompressionConfig) -> bool:
    """A directory model whose float32 weights exceed half the available memory is streamed by default."""
    if isinstance(model, nn.Module) or config.search_steps:
        return False
    path = resolve_model_path(model)
    try:
        return not is_compressed(path) and any(path.glob("*.safetensors")) and too_big_for_memory(path)
    except CaspError:
        return False   # an unreadable checkpoint is reported by the loader, with its own message


def plan_and_allocate(model, adapter, batches, held, config: CompressionConfig, quantizer, transform, progress, cache,
                      layer_source):
    """Q/K ranks, units and each unit's setting: measured on the original model, then allocated."""
    layers = adapter.decoder_layers(model)
    ranks, units, qk_tables, database = plan_ranks_and_units(model, adapter, batches, config, quantizer, transform,
                                                             progress, cache, layer_source)
    plan, summary = {}, {}
    if qk_tables is not None or config.search_steps:
        if qk_tables is not None:
            solution = allocate_joint(units, qk_tables, quantizer, bits=config.bits, granularity=config.granularity,
                                      num_layers=len(layers), transform=transform)
            summary["joint_allocation"] = solution.summary
        else:
            solution = solve(units, quantizer, bits=config.bits, rule="rd", granularity=config.granularity,
                             num_layers=len(layers), transform=transform)
        if config.search_steps:
            summary["search"] = search(model, adapter, solution, database, held, steps=config.search_steps,
                                       seed=config.seed, progress=progress, device=config.device,
                                       starts={**solution.alternatives,
                                               "uniform": uniform_choice(solution, quantizer, config.bits)})
        ranks, plan = decode(solution, units, quantizer, qk_tables or {}, len(layers))
        units = plan_units(layers, adapter, ranks, config.layers)
    elif quantizer is not None:
        plan = allocate(units, quantizer, bits=config.bits, rule=config.allocation, granularity=config.granularity,
                        num_layers=len(layers), transform=transform)
    return ranks, units, plan, summary
