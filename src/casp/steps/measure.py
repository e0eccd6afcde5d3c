"""Step: each unit's damage at each candidate setting, measured on the original layer's inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.algorithms.distortion import weighted_distortion
from casp.steps.quantize import factorise, transform_seed, unit_weight_and_xtx
from casp.steps.units import Role, Unit

MEASURE_ROWS = 256   # output rows a large matrix's damage is estimated from (rows-independent quantizers)

# Measured damage (`casp.steps.layer_scales`): a layer is probed at the first of these uniform settings that the
# quantizer offers. One probe is enough: on Gemma-3-270M a layer's KL per unit of estimate moved at most 1.7-fold
# between 2, 3 and 4 bits, against 130-fold between layers (docs/allocation.md).
PROBE_BITS = (3, 2, 4)


def probe_settings(codec) -> list:
    """The probe setting (a list of one; empty when the codec offers none of `PROBE_BITS`)."""
    labels = {s.label() for s in codec.candidates()}
    for bits in PROBE_BITS:
        try:
            setting = codec.uniform_setting(bits)
        except ValueError:
            continue
        if setting.label() in labels:
            return [setting]
    return []


def is_probed(unit: Unit) -> bool:
    """Probes put whole projections at a setting; Q/K factors follow their projection's scale."""
    return unit.role is Role.DENSE


@dataclass
class Target:
    """A matrix to measure: its weight, the XᵀX of its input, the Fisher weights of its outputs (or None), and
    for a down factor the up factor its error is lifted through (or None)."""

    w: torch.Tensor
    xtx: torch.Tensor
    fisher: torch.Tensor | None = None
    lift: torch.Tensor | None = None
    svd: object = None   # its `whitened_svd`, when several ranks of it are measured (computed once)


def measured_rows(unit: Unit, out_features: int, codec, *, exact: bool, seed: int,
                  count: int = 0) -> torch.Tensor | None:
    """A fixed random subset of output rows to measure on, or None for all of them.

    A codec whose rows are quantized independently (GPTQ, RTN without a transform: one XᵀX, a grid per
    row group) has a damage that is a sum over rows, so a uniform sample scaled by out/rows estimates it
    without bias; the same rows serve every setting, so the settings of a unit compare on equal terms.
    """
    count = count or MEASURE_ROWS
    if exact or not codec.samples_rows or out_features <= count:
        return None
    g = torch.Generator().manual_seed(transform_seed(seed, unit))
    return torch.randperm(out_features, generator=g)[:count].sort().values


def on_rows(rows: torch.Tensor | None, w: torch.Tensor, fisher: torch.Tensor | None):
    """(scale to the whole matrix, w's rows, the Fisher weights of those rows) of a row sample (None: all)."""
    if rows is None:
        return 1.0, w, fisher
    return (w.shape[0] / rows.numel(), w[rows.to(w.device)],
            fisher[rows.to(fisher.device)] if fisher is not None else None)


def unit_distortions(codec, unit: Unit, target: Target, settings, *, seed: int = 0,
                     exact: bool = False) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Fisher-weighted output distortion of `target.w` at each setting (label -> value), and the quantized weights.

    Unless `exact`, the damage of a large matrix is estimated from `measured_rows` (`Codec.sampled_damages`),
    and no weights are returned. Factor errors are lifted through another matrix, so those are always
    measured whole.
    """
    rows = measured_rows(unit, target.w.shape[0], codec, exact=exact or target.lift is not None, seed=seed)
    w = target.w.float()
    if rows is not None:
        damages = codec.sampled_damages(target, settings, transform_seed(seed, unit), rows)
        return {s.label(): d for s, d in zip(settings, damages)}, []
    quantized = codec.dequantize_many(w, target.xtx, settings, transform_seed(seed, unit))
    values = {s.label(): weighted_distortion(wq - w, target.xtx, target.fisher, target.lift)
              for s, wq in zip(settings, quantized)}
    return values, quantized


def fisher_of_unit(run, fisher: dict | None, unit: Unit):
    """The output Fisher of the projection a unit belongs to, or None."""
    return fisher.get(f"{run.prefix(unit.layer)}{unit.module}") if fisher else None


def measure_distortions(run, measured, layers: dict, analysis: dict) -> None:
    """Fill `unit.distortion[label]` for the units of `layers` (index -> layer, on the run's device).

    With `measured.database`, also store each quantized weight (fp16, original basis, on the CPU) under
    (unit.key, label); every row is then measured. With `measured.probes`, store each dense unit's weight at
    the probe settings (`casp.steps.layer_scales`) there the same way.
    """
    keep = measured.database
    settings = run.codec.candidates()
    probes = probe_settings(run.codec) if measured.probes is not None else []
    for i in sorted(layers):
        layer = layers[i]
        moments = {k: v.to(run.device) for k, v in analysis[i].moments.items()}
        lowrank = factorise(layer, run.adapter, measured.ranks[i], moments["attn_in"].double())
        for u in [u for u in measured.units if u.layer == i]:
            w, xtx = unit_weight_and_xtx(u, layer, lowrank, moments)
            lift = lowrank[u.module].up.weight.data if u.role is Role.DOWN else None
            target = Target(w, xtx, fisher_of_unit(run, measured.fisher, u), lift)
            exact = keep is not None
            probed = bool(probes) and is_probed(u)
            ratio = run.codec.quantizer.ratio_rows if probed and not exact else 0
            sampled = measured_rows(u, w.shape[0], run.codec, exact=exact or lift is not None, seed=run.seed,
                                    count=ratio)
            by_ratio = bool(ratio) and sampled is not None   # `ratio` is 0 unless the unit is probed
            sample = (dict(zip([s.label() for s in settings], run.codec.sampled_damages(
                target, settings, transform_seed(run.seed, u), sampled, u.hints))) if by_ratio else {})
            coded = _probe_weights(run, u, target, probes) if probed and sampled is not None else {}
            at_probe = {label: weighted_distortion(wq - target.w.float(), target.xtx, target.fisher)
                        for label, wq in coded.items()}
            if by_ratio:
                swept, quantized = [], []
                values = _ratio_damages(sample, at_probe)
            else:
                swept = [s for s in settings if s.label() not in coded]
                values, quantized = unit_distortions(run.codec, u, target, swept, seed=run.seed, exact=exact)
            u.distortion.update(values)
            u.distortion.update(at_probe)
            if keep is not None:
                for s, wq in zip(swept, quantized):
                    keep[(u.key, s.label())] = wq.half().cpu()
            if probes and is_probed(u):
                whole = {**dict(zip((s.label() for s in swept), quantized)), **coded}
                measured.probes.update({(u.key, s.label()): whole[s.label()].half().cpu() for s in probes})


def _ratio_damages(sample: dict[str, float], whole: dict[str, float]) -> dict[str, float]:
    """Each setting's damage as the whole probe weight's damage times the setting's ratio to the probe on a row
    sample (`Quantizer.ratio_rows`): the sample's level, the noisiest part of a small sample, cancels."""
    (probe, level), = whole.items()
    if not sample.get(probe, 0.0) > 0.0:
        return {label: d for label, d in sample.items() if label != probe}
    return {label: level * d / sample[probe] for label, d in sample.items() if label != probe}


def _probe_weights(run, unit: Unit, target: Target, probes) -> dict[str, torch.Tensor]:
    """The unit's whole weight at each probe setting, coded as the layer pass codes it (`Codec.quantize`: E8 at the
    scale multiplier the unit's sweep hinted, else one chosen on a row sample; the matrix coded once). Where the other
    settings' damages come from a row sample, the probe setting's is then measured on this whole weight instead."""
    seed = transform_seed(run.seed, unit)
    return {s.label(): run.codec.quantize(target.w.float(), target.xtx, s, seed, unit.hints.get(s.label()))[1]
            for s in probes}
