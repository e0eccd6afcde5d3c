"""One compression run, top to bottom.

load -> calibrate -> analyse the original layers (attention density, XᵀX, Q/K spectra)
-> choose Q/K ranks -> measure each unit's distortion at each candidate -> allocate bits
-> compress layer by layer (low-rank Q/K, then quantize every linear) -> report -> save.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.algorithms import allocate as alloc
from casp.models.adapters import Adapter, adapter_for
from casp.data.calibration import build_calibration
from casp.config import CompressionConfig
from casp.models.engine import (
    SecondMoments, capture_layer0_inputs, peak_device_mb, peak_rss_mb, record_attention_inputs,
    record_second_moments, run_layer,
)
from casp.errors import CaspError
from casp.algorithms.lowrank import LowRankLinear, auto_ranks, check_rank, factor_input_xtx, rank_for_ratio, whitened_lowrank, whitened_singular_values
from casp.io.modelio import is_compressed, load_model, load_processor, resolve_model_path
from casp.nn.packed_linear import PackedLinear
from casp.quant.packing import storage_bits
from casp.quant.base import QuantSpec, get_quantizer_class
from casp.analysis.attention_stats import LayerAttentionStats, layer_attention_stats

log = logging.getLogger(__name__)

FP16_BITS = 16
QK = ("q", "k")


@dataclass
class CompressionResult:
    model: nn.Module
    processor: object
    source: Path
    report: dict
    config: CompressionConfig
    out: Path | None = None


@dataclass
class UnitPlan:
    """One stored matrix: a plain linear or one factor of a low-rank Q/K."""

    name: str            # dotted path inside the decoder layer, e.g. self_attn.q_proj.down
    layer: int
    group: str           # which XᵀX feeds it (adapter input group), or the factor rule
    out_features: int
    in_features: int
    num_weights: int     # weights of the original (pre-low-rank) matrix attributed to this unit
    kind: str
    distortion: dict[str, float] = field(default_factory=dict)   # candidate label -> measured distortion


def _group_of(adapter: Adapter) -> dict[str, str]:
    return {name: g for g, names in adapter.linears.items() for name in names}


def quantizer_for(config: CompressionConfig):
    if config.quantizer == "none":
        return None
    cls = get_quantizer_class(config.quantizer)
    if config.quantizer == "gptq":
        return cls(damp=config.damp, act_order=config.act_order)
    return cls()


def candidate_specs(config: CompressionConfig) -> list[QuantSpec]:
    groups = list(dict.fromkeys(config.candidate_group_sizes))
    return [QuantSpec(b, g, config.sym) for b in sorted(set(config.candidate_bits)) for g in groups]


# --------------------------------------------------------------------------- analysis


def observe_layer(layer, adapter, inputs, groups, device):
    """Run a layer once on the caught inputs; return its outputs, XᵀX of `groups`, and its attention inputs."""
    moments, attn_inputs = SecondMoments(), []
    with record_second_moments(layer, groups, moments), record_attention_inputs(layer, adapter, attn_inputs):
        outs = run_layer(layer, inputs, device)
    return outs, moments, attn_inputs


def _qk_pair(layer, adapter, lowrank: dict):
    """(q module, k module) with the low-rank replacements where there are any; None if there are none."""
    if not lowrank:
        return None
    return tuple(lowrank.get(adapter.qk_name(p), layer.get_submodule(adapter.qk_name(p)))
                 for p in QK)


def analyse(model, adapter, batches, config, *, keep_moments: bool, progress: bool):
    """Run the original layers once: XᵀX per input group, attention density, whitened Q/K spectra."""
    geometry = adapter.attention_geometry(model)
    inputs = capture_layer0_inputs(model, adapter, batches)
    per_layer = []
    for i, layer in enumerate(tqdm(adapter.decoder_layers(model), desc="analyse", disable=not progress)):
        outs, moments, attn_inputs = observe_layer(layer, adapter, inputs, adapter.linears, config.device)
        stats = layer_attention_stats(layer, adapter, geometry, attn_inputs, mass=config.density_mass)
        h = moments.xtx["attn_in"]
        spectra = {
            p: whitened_singular_values(layer.get_submodule(adapter.qk_name(p)).weight.data, h)
            for p in QK
        }
        per_layer.append({
            "density": stats,
            "spectra": spectra,
            "moments": {k: v.float() for k, v in moments.xtx.items()} if keep_moments else None,
        })
        inputs.hidden = outs
    return per_layer


def choose_ranks(model, adapter, analysis, config) -> list[dict[str, int]]:
    """Per layer, the rank of W_q and W_k (0 = keep dense)."""
    layers = adapter.decoder_layers(model)
    for p in QK:
        name = adapter.qk_name(p)
        if not isinstance(getattr(layers[0].get_submodule(adapter.attention), name.rsplit(".", 1)[-1], None), nn.Linear):
            raise CaspError(f"this model has no separate {name} projection; low-rank Q/K needs separate W_q and W_k "
                            "(use --qk-rank 0)")
    shapes = [
        {p: tuple(layer.get_submodule(adapter.qk_name(p)).weight.shape) for p in QK} for layer in layers
    ]
    if config.qk_rank == "auto":
        base = 0.25
        budget = sum(rank_for_ratio(*s[p], base) * sum(s[p]) for s in shapes for p in QK)
        spectra = [a["spectra"][p] for a in analysis for p in QK]
        weights = [a["density"].mean_density for a in analysis for p in QK]
        flat = auto_ranks(spectra, [s[p] for s in shapes for p in QK], weights, budget, min_rank=1)
        return [{p: flat[2 * i + j] for j, p in enumerate(QK)} for i in range(len(layers))]
    ranks = []
    for i, s in enumerate(shapes):
        value = config.qk_rank_overrides.get(i, float(config.qk_rank))
        r = {p: rank_for_ratio(*s[p], value) if value <= 1 else int(value) for p in QK}
        for p in QK:
            try:
                check_rank(*s[p], r[p])
            except ValueError as e:
                raise CaspError(f"layer {i} W_{p}: {e}") from None
        ranks.append(r)
    return ranks


def plan_units(model, adapter, ranks, layers: tuple[int, ...] | None = None) -> list[UnitPlan]:
    """The stored matrices of the selected decoder layers (all by default)."""
    groups = _group_of(adapter)
    units = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        if layers is not None and i not in layers:
            continue
        for name in adapter.linear_names():
            m, n = layer.get_submodule(name).weight.shape
            proj = name.rsplit(".", 1)[-1][0]
            r = ranks[i].get(proj, 0) if name in (adapter.q_proj, adapter.k_proj) else 0
            if r:
                down_share = (m * n * n) // (m + n)
                units.append(UnitPlan(f"{name}.down", i, groups[name], r, n, down_share, f"{proj}_factor"))
                units.append(UnitPlan(f"{name}.up", i, "factor_up", m, r, m * n - down_share, f"{proj}_factor"))
            else:
                units.append(UnitPlan(name, i, groups[name], m, n, m * n, name.rsplit(".", 1)[-1]))
    return units


def _factorise(layer, adapter, ranks_i, xtx_attn) -> dict[str, LowRankLinear]:
    out = {}
    for p in QK:
        r = ranks_i.get(p, 0)
        if not r:
            continue
        lin = layer.get_submodule(adapter.qk_name(p))
        a, b = whitened_lowrank(lin.weight.data.float(), xtx_attn, r)
        bias = lin.bias.data.clone() if lin.bias is not None else None
        out[adapter.qk_name(p)] = LowRankLinear.from_factors(a, b, bias)
    return out


def _unit_weight_and_xtx(unit: UnitPlan, layer, lowrank: dict, moments: dict):
    """The matrix a unit stores, and the XᵀX of its input."""
    if unit.group == "factor_up":
        lr = lowrank[unit.name.rsplit(".", 1)[0]]
        down = lr.down.dequantized_weight() if isinstance(lr.down, PackedLinear) else lr.down.weight.data
        return lr.up.weight.data, factor_input_xtx(down.to(moments["attn_in"].dtype), moments["attn_in"])
    if unit.name.endswith(".down") and unit.name.rsplit(".", 1)[0] in lowrank:
        return lowrank[unit.name.rsplit(".", 1)[0]].down.weight.data, moments["attn_in"]
    return layer.get_submodule(unit.name).weight.data, moments[unit.group]


def _weighted_distortion(delta, xtx, fisher, lift=None) -> float:
    """Σ_o F_o (Δ H Δᵀ)_oo; `lift` maps a factor's output error onto the projection's output."""
    per_row_cross = delta.double() @ xtx.double()
    if lift is not None:
        lifted = lift.double() @ delta.double()
        per_row = ((lift.double() @ per_row_cross) * lifted).sum(1)
    else:
        per_row = (per_row_cross * delta.double()).sum(1)
    w = fisher.double() if fisher is not None else torch.ones_like(per_row)
    return float((w * per_row).sum())


def measure_distortions(model, adapter, units, analysis, ranks, specs, quantizer, fisher, progress) -> None:
    """Quantize every unit at every candidate on the original inputs; distortion = Fisher-weighted loss."""
    layers = adapter.decoder_layers(model)
    by_layer: dict[int, list[UnitPlan]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    for i in tqdm(sorted(by_layer), desc="measure", disable=not progress):
        layer = layers[i]
        moments = analysis[i]["moments"]
        lowrank = _factorise(layer, adapter, ranks[i], moments["attn_in"].double())
        for u in by_layer[i]:
            w, xtx = _unit_weight_and_xtx(u, layer, lowrank, moments)
            base = u.name.rsplit(".", 1)[0] if u.kind.endswith("_factor") else u.name
            f = fisher.get(f"{adapter.layers}.{i}.{base}") if fisher else None
            lift = lowrank[base].up.weight.data if u.name.endswith(".down") and base in lowrank else None
            for spec in specs:
                _, wq = quantizer.quantize(w.float(), xtx.float(), spec)
                u.distortion[spec.label()] = _weighted_distortion(wq - w.float(), xtx, f, lift)


def allocate(units, specs, config, num_layers) -> dict[str, QuantSpec]:
    """Map each unit to a candidate spec under the bit budget."""
    by_label = {s.label(): s for s in specs}
    if config.allocation == "uniform":
        spec = QuantSpec(int(config.bits), config.group_size, config.sym)
        return {f"{u.layer}:{u.name}": spec for u in units}
    a_units = [
        alloc.Unit(
            name=f"{u.layer}:{u.name}", num_weights=u.num_weights,
            cost_bits={s.label(): storage_bits(s, u.out_features, u.in_features) for s in specs},
            distortion=u.distortion, layer_index=u.layer, kind=u.kind,
        )
        for u in units
    ]
    members = {u.name: [u.name] for u in a_units}
    if config.granularity == "layer" and config.allocation == "rd":
        a_units, members = _merge_per_layer(a_units)
    try:
        if config.allocation == "paper":
            result = alloc.allocate_paper(a_units, config.bits, num_layers)
        else:
            result = alloc.allocate_rd(a_units, config.bits, solver="best")
    except alloc.InfeasibleBudget as e:
        raise CaspError(str(e)) from None
    return {m: by_label[key] for name, key in result.choice.items() for m in members[name]}


def _merge_per_layer(units):
    """One unit per decoder layer for its dense matrices (factors keep their own unit): same setting for all."""
    merged, members = {}, {}
    for u in units:
        name = u.name if u.kind.endswith("_factor") else f"layer{u.layer_index}"
        if name not in merged:
            merged[name] = alloc.Unit(name=name, num_weights=0, cost_bits=dict.fromkeys(u.cost_bits, 0),
                                      distortion=dict.fromkeys(u.distortion, 0.0), layer_index=u.layer_index,
                                      kind=u.kind if u.kind.endswith("_factor") else "layer")
            members[name] = []
        m = merged[name]
        m.num_weights += u.num_weights
        for k, v in u.cost_bits.items():
            m.cost_bits[k] += v
        for k, v in u.distortion.items():
            m.distortion[k] += v
        members[name].append(u.name)
    return list(merged.values()), members


# --------------------------------------------------------------------------- the run


def load_with_calibration(model, config):
    """Resolve and load the (uncompressed) model, its processor, adapter and calibration batches."""
    source = resolve_model_path(model)
    if is_compressed(source):
        raise CaspError(f"{source} is already compressed by casp; use the original model")
    loaded = load_model(source)
    processor = load_processor(source)
    adapter = adapter_for(loaded)
    batches = build_calibration(adapter, processor, source, n_samples=config.calib_samples, seq_len=config.calib_seq_len,
                                seed=config.seed, jsonl=config.calib_jsonl, text_file=config.calib_text)
    return source, loaded, processor, adapter, batches


def plan_ranks_and_units(model, adapter, batches, config, quantizer, specs, progress, cache=None):
    """Everything measured on the original model: Q/K ranks, and the units with their distortions.

    Runs the sensitivity and analysis passes only when something needs them (rate-distortion
    allocation, auto ranks). `cache` (a dict) lets several runs that differ only in the target
    bits or allocation rule share this work, e.g. in benchmarks.
    """
    measure = quantizer is not None and config.allocation == "rd"
    key = (repr(config.qk_rank), tuple(sorted(config.qk_rank_overrides.items())), measure, config.quantizer,
           tuple(s.label() for s in specs), config.damp, config.act_order, config.calib_samples, config.calib_seq_len,
           config.calib_jsonl, config.calib_text, config.seed, config.density_mass, config.layers)
    if cache is not None and key in cache:
        ranks, units = cache[key]
        return ranks, copy.deepcopy(units)
    ranks = None if config.qk_rank == "auto" else choose_ranks(model, adapter, None, config)
    if measure or ranks is None:
        fisher = None
        if measure:
            from casp.analysis.sensitivity import output_fisher

            fisher = output_fisher(model, adapter, batches, progress)
        analysis = analyse(model, adapter, batches, config, keep_moments=measure, progress=progress)
        ranks = ranks or choose_ranks(model, adapter, analysis, config)
    units = plan_units(model, adapter, ranks, config.layers)
    if measure:
        measure_distortions(model, adapter, units, analysis, ranks, specs, quantizer, fisher, progress)
    if cache is not None:
        cache[key] = (ranks, copy.deepcopy(units))
    return ranks, units


def compress(model: str | Path | None = None, out: str | Path | None = None, config: CompressionConfig | None = None,
             *, overwrite: bool = False, progress: bool = True, cache: dict | None = None) -> CompressionResult:
    """Compress a model with CASP; write it to `out` when given. Returns the in-memory model and report."""
    config = (config or CompressionConfig()).validate()
    if out is not None:
        from casp.io.storage import check_output_dir

        check_output_dir(Path(out), overwrite)
    torch.manual_seed(config.seed)
    t_start = time.time()
    source, model, processor, adapter, batches = load_with_calibration(model, config)
    quantizer = quantizer_for(config)
    layers = adapter.decoder_layers(model)
    geometry = adapter.attention_geometry(model)
    specs = candidate_specs(config)
    ranks, units = plan_ranks_and_units(model, adapter, batches, config, quantizer, specs, progress, cache)
    plan = allocate(units, specs, config, len(layers)) if quantizer is not None else {}

    inputs = capture_layer0_inputs(model, adapter, batches)
    layer_reports = []
    for i, layer in enumerate(tqdm(layers, desc="compress", disable=not progress)):
        if config.layers is not None and i not in config.layers:
            inputs.hidden = run_layer(layer, inputs, config.device)
            continue
        t_layer = time.time()
        layer.to(config.device)
        _, moments, attn_inputs = observe_layer(layer, adapter, inputs, adapter.linears, config.device)
        xtx = {k: v.to(config.device) for k, v in moments.xtx.items()}
        lowrank = _factorise(layer, adapter, ranks[i], xtx["attn_in"])
        stats: LayerAttentionStats = layer_attention_stats(layer, adapter, geometry, attn_inputs, config.density_mass,
                                                           _qk_pair(layer, adapter, lowrank))
        for name, module in lowrank.items():
            layer.set_submodule(name, module)
        unit_rows = []
        for u in (u for u in units if u.layer == i):
            w, h = _unit_weight_and_xtx(u, layer, lowrank, xtx)
            target = layer.get_submodule(u.name)
            bias = target.bias.data.clone() if target.bias is not None else None
            if quantizer is None:
                unit_rows.append({"name": f"{adapter.layers}.{i}.{u.name}", "bits": 16, "group_size": None,
                                  "stored_bits": w.numel() * FP16_BITS, "num_weights": u.num_weights})
                continue
            spec = plan[f"{i}:{u.name}"]
            qw, _ = quantizer.quantize(w.float(), h.float(), spec)
            layer.set_submodule(u.name, PackedLinear.from_quantized(qw, bias))
            unit_rows.append({
                "name": f"{adapter.layers}.{i}.{u.name}", "bits": spec.bits, "group_size": spec.group_size,
                "sym": spec.sym, "stored_bits": qw.stored_bits(), "num_weights": u.num_weights,
                "bits_per_weight": qw.stored_bits() / max(u.num_weights, 1),
                "distortion": u.distortion.get(spec.label()),
            })
        inputs.hidden = run_layer(layer, inputs, config.device)
        layer.to("cpu")
        layer_reports.append({
            "index": i,
            "rank_q": ranks[i].get("q", 0),
            "rank_k": ranks[i].get("k", 0),
            **stats.as_report(),
            "units": unit_rows,
            "seconds": time.time() - t_layer,
        })

    from casp.report import build_report

    report = build_report(
        config=config, source=source, adapter=adapter, model=model, layer_reports=layer_reports,
        seconds=time.time() - t_start, peak_rss_mb=peak_rss_mb(), peak_device_mb=peak_device_mb(config.device),
        calibration_batches=len(batches), calibration_tokens=sum(b["input_ids"].numel() for b in batches),
    )
    result = CompressionResult(model=model, processor=processor, source=source, report=report, config=config)
    if out is not None:
        from casp.io.storage import save_compressed

        result.out = save_compressed(result, Path(out), overwrite=overwrite)
    return result


def measure_sparsity(model: str | Path | None = None, config: CompressionConfig | None = None,
                     progress: bool = True) -> dict:
    """`casp sparsity`: per layer and head, attention density; with a rank ratio, low-rank error and our bound."""
    config = (config or CompressionConfig()).validate()
    torch.manual_seed(config.seed)
    source, model, processor, adapter, batches = load_with_calibration(model, config)
    geometry = adapter.attention_geometry(model)
    analysis = analyse(model, adapter, batches, config, keep_moments=False, progress=progress) if config.qk_rank == "auto" else None
    ranks = choose_ranks(model, adapter, analysis, config) if config.qk_rank and config.qk_rank != 0 else None
    inputs = capture_layer0_inputs(model, adapter, batches)
    layers = []
    for i, layer in enumerate(tqdm(adapter.decoder_layers(model), desc="sparsity", disable=not progress)):
        groups = {"attn_in": adapter.linears["attn_in"]}
        outs, moments, attn_inputs = observe_layer(layer, adapter, inputs, groups, config.device)
        lowrank = _factorise(layer, adapter, ranks[i], moments.xtx["attn_in"]) if ranks else {}
        s = layer_attention_stats(layer, adapter, geometry, attn_inputs, config.density_mass,
                                  _qk_pair(layer, adapter, lowrank))
        layers.append({"index": i, "rank_q": ranks[i]["q"] if ranks else 0, "rank_k": ranks[i]["k"] if ranks else 0,
                       **s.as_report()})
        inputs.hidden = outs
    tokens = sum(b["input_ids"].numel() for b in batches)
    return {
        "model": str(source),
        "definition": f"per head and query row, the fraction of visible keys holding {config.density_mass:.0%} "
                      "of the attention mass, averaged over rows",
        "mass": config.density_mass,
        "qk_rank": config.qk_rank,
        "calibration_tokens": tokens,
        "mean_density": sum(lr["density"] for lr in layers) / len(layers),
        "layers": layers,
    }
