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


def measured_rows(unit: Unit, out_features: int, codec, *, exact: bool, seed: int) -> torch.Tensor | None:
    """A fixed random subset of output rows to measure on, or None for all of them.

    A codec whose rows are quantized independently (GPTQ, RTN without a transform: one XᵀX, a grid per
    row group) has a damage that is a sum over rows, so a uniform sample scaled by out/rows estimates it
    without bias; the same rows serve every setting, so the settings of a unit compare on equal terms.
    """
    if exact or not codec.samples_rows or out_features <= MEASURE_ROWS:
        return None
    g = torch.Generator().manual_seed(transform_seed(seed, unit))
    return torch.randperm(out_features, generator=g)[:MEASURE_ROWS].sort().values


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
            values, quantized = unit_distortions(run.codec, u, target, settings, seed=run.seed, exact=keep is not None)
            u.distortion.update(values)
            if keep is not None:
                for s, wq in zip(settings, quantized):
                    keep[(u.key, s.label())] = wq.half().cpu()
            if probes and is_probed(u):
                _keep_probes(run, u, target, probes, dict(zip((s.label() for s in settings), quantized)),
                             measured.probes)


def _keep_probes(run, unit: Unit, target: Target, probes, quantized: dict, store: dict) -> None:
    """The unit's whole weight at each probe setting (reused from `quantized` where measured whole), coded as the
    layer pass codes it (`Codec.quantize`: E8 picks its scale on a row sample and codes the matrix once)."""
    seed = transform_seed(run.seed, unit)
    for s in probes:
        weight = quantized.get(s.label())
        if weight is None:
            weight = run.codec.quantize(target.w.float(), target.xtx, s, seed)[1]
        store[(unit.key, s.label())] = weight.half().cpu()
