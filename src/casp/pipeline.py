"""One compression run, top to bottom.

load -> check the budget from the shapes -> calibrate -> plan (Q/K ranks, units, each unit's damage at
each candidate, joint Q/K options) -> allocate bits (optionally searched by held-out KL) -> compress
layer by layer (low-rank Q/K, transform, quantizer) -> report -> save.
Each step is a function in `casp.steps` that gets only what it needs.
"""
from __future__ import annotations

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
from casp.steps.allocation import allocate, allocate_joint, check_feasible, decode, solve, uniform_choice
from casp.steps.compress_layer import compress_layer
from casp.steps.plan import plan_ranks_and_units
from casp.steps.ranks import check_separate_qk
from casp.steps.search import search
from casp.steps.units import plan_units


@dataclass
class CompressionResult:
    model: nn.Module
    processor: object
    source: Path
    report: dict
    config: CompressionConfig
    out: Path | None = None


def load_with_calibration(model, config: CompressionConfig, processor=None, before_calibration=None):
    """The (uncompressed) model, its processor, adapter and calibration batches.

    `model` is a local directory, a built-in name, None (the embedded model), or a model already
    in memory (then compressed in place; its processor is loaded from its `name_or_path` unless given).
    `before_calibration(model, adapter)` runs checks that need only the shapes, before any data work.
    """
    if isinstance(model, nn.Module):
        loaded, source = model, Path(getattr(model.config, "_name_or_path", "") or ".")
        processor = processor if processor is not None else load_processor(source)
    else:
        source = resolve_model_path(model)
        if is_compressed(source):
            raise CaspError(f"{source} is already compressed by casp; use the original model")
        loaded = load_model(source)
        processor = processor if processor is not None else load_processor(source)
    adapter = adapter_for(loaded)
    if before_calibration is not None:
        before_calibration(loaded, adapter)
    held = config.search_samples if config.search_steps else 0
    batches = build_calibration(adapter, processor, source, n_samples=config.calib_samples + held,
                                seq_len=config.calib_seq_len, seed=config.seed, jsonl=config.calib_jsonl,
                                text_file=config.calib_text)
    return source, loaded, processor, adapter, batches


def compress(model: str | Path | nn.Module | None = None, out: str | Path | None = None,
             config: CompressionConfig | None = None, *, processor=None, overwrite: bool = False,
             progress: bool = True, cache: dict | None = None) -> CompressionResult:
    """Compress a model with CASP; write it to `out` when given. Returns the in-memory model and report."""
    config = (config or CompressionConfig()).validate()
    quantizer, transform = config.build_quantizer(), config.build_transform()
    if out is not None:
        from casp.io.storage import check_output_dir

        check_output_dir(Path(out), overwrite)
    torch.manual_seed(config.seed)
    t_start = time.time()

    def feasible(model, adapter):
        check_separate_qk(adapter.decoder_layers(model), adapter, config.qk_rank, config.qk_rank_overrides)
        if quantizer is not None and config.allocation != "uniform" and config.qk_rank != "auto":
            check_feasible(adapter.decoder_layers(model), adapter, quantizer, config, transform)

    source, model, processor, adapter, batches = load_with_calibration(model, config, processor, feasible)
    held = []
    if config.search_steps:
        batches, held = hold_out(batches, config.search_samples)
    layers = adapter.decoder_layers(model)
    ranks, units, qk_tables, database = plan_ranks_and_units(model, adapter, batches, config, quantizer, transform,
                                                             progress, cache)
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
            summary["search"] = search(model, layers, solution, database, held, steps=config.search_steps,
                                       seed=config.seed, starts=[uniform_choice(solution, quantizer, config.bits)],
                                       progress=progress)
        ranks, plan = decode(solution, units, quantizer, qk_tables or {}, len(layers))
        units = plan_units(layers, adapter, ranks, config.layers)
    elif quantizer is not None:
        plan = allocate(units, quantizer, bits=config.bits, rule=config.allocation, granularity=config.granularity,
                        num_layers=len(layers), transform=transform)

    geometry = adapter.attention_geometry(model)
    layer_reports = []
    for step in walk_layers(model, adapter, batches, device=config.device, only=config.layers, desc="compress",
                            progress=progress):
        mine = [u for u in units if u.layer == step.index]
        layer_reports.append(compress_layer(step, adapter, mine, ranks[step.index], plan, quantizer, geometry=geometry,
                                            density_mass=config.density_mass, device=config.device,
                                            transform=transform, seed=config.seed))

    from casp.report import build_report

    report = build_report(
        config=config, source=source, adapter=adapter, layer_reports=layer_reports,
        seconds=time.time() - t_start, peak_rss_mb=peak_rss_mb(), peak_device_mb=peak_device_mb(config.device),
        calibration_batches=len(batches), calibration_tokens=sum(b["input_ids"].numel() for b in batches),
    )
    report.update(summary)
    result = CompressionResult(model=model, processor=processor, source=source, report=report, config=config)
    if out is not None:
        from casp.io.storage import save_compressed

        result.out = save_compressed(result, Path(out), overwrite=overwrite)
    return result
