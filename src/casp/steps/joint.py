"""Step (--qk-rank joint): W_q / W_k rank and bit setting chosen together, by measured damage.

For each layer's W_q and W_k the candidates are: dense at every quantizer setting, and each rank of a
ladder (fractions of the parameters kept, as `rank_for_ratio`) with both factors at one setting. Every
candidate is costed exactly (factors' stored bits, transform parameters included) and its damage is
the Fisher-weighted output distortion of the whole reconstructed projection Â·B̂ − W on the original
inputs, so the low-rank error and the quantization error are priced together, in the same units as
every other matrix. Dense is always a candidate, so the allocator can keep dense Q/K where attention
is dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from casp.algorithms.distortion import weighted_distortion
from casp.algorithms.lowrank import factor_input_xtx, rank_for_ratio, whitened_svd
from casp.steps.costs import unit_cost
from casp.steps.measure import Target, fisher_of_unit, measured_rows, on_rows, unit_distortions
from casp.steps.quantize import transform_seed
from casp.steps.units import Role, Unit, UnitKey

DENSE = "dense"


@dataclass(frozen=True)
class QKOption:
    """One joint candidate of a projection: rank (0 = dense) and the setting of its matrix or factors."""

    rank: int
    setting: object

    @property
    def label(self) -> str:
        return f"{DENSE if not self.rank else f'r{self.rank}'}:{self.setting.label()}"


def qk_options(unit: Unit, settings, ratios, rank_multiple: int = 1) -> list[QKOption]:
    """Dense at every setting, then every distinct rank of the ladder at every setting."""
    ranks = []
    for ratio in ratios:
        r = rank_for_ratio(unit.out_features, unit.in_features, ratio)
        r = max(rank_multiple, r - r % rank_multiple)
        if 0 < r < min(unit.out_features, unit.in_features) and r not in ranks:
            ranks.append(r)
    return [QKOption(0, s) for s in settings] + [QKOption(r, s) for r in ranks for s in settings]


def _factor_units(unit: Unit, rank: int) -> tuple[Unit, Unit]:
    down = Unit(unit.layer, unit.module, Role.DOWN, unit.input_group, rank, unit.in_features, 0, unit.qk)
    up = Unit(unit.layer, unit.module, Role.UP, unit.input_group, unit.out_features, rank, 0, unit.qk)
    return down, up


def option_cost(unit: Unit, option: QKOption, codec) -> int:
    """Exact stored bits of a projection under an option (`codec`: anything with `stored_bits`)."""
    if not option.rank:
        return unit_cost(unit, option.setting, codec)
    down, up = _factor_units(unit, option.rank)
    return unit_cost(down, option.setting, codec) + unit_cost(up, option.setting, codec)


def lowrank_distortions(codec, unit: Unit, rank: int, target: Target, seed: int = 0,
                        rows: torch.Tensor | None = None) -> list[tuple[float, torch.Tensor]]:
    """Per candidate setting: the Fisher-weighted distortion of Â·B̂ − W (both factors at that setting), and Â·B̂.

    B̂ is quantized on the original inputs, Â on B̂'s outputs (their XᵀX). With `rows`, only those
    output rows of Â and W are measured and the damage is scaled to the whole matrix. The target's
    `whitened_svd` is computed here unless it carries one (`Target.svd`, once for every rank of a ladder).
    """
    w, h = target.w.float(), target.xtx
    a, b = (target.svd or whitened_svd(w, h.double())).factors(rank)
    down, up = _factor_units(unit, rank)
    scale, w, fisher = on_rows(rows, w, target.fisher)
    if rows is not None:
        a = a[rows.to(a.device)]
    out = []
    settings = codec.candidates()
    for s, bq in zip(settings, codec.dequantize_many(b.float(), h, settings, transform_seed(seed, down))):
        h_up = factor_input_xtx(bq.to(h.dtype), h)
        aq, = codec.dequantize_many(a.float(), h_up, [s], transform_seed(seed, up))
        product = aq.double() @ bq.double()
        out.append((scale * weighted_distortion(product - w.double(), h, fisher), product.float()))
    return out


def measure_qk_options(run, measured, layers: dict, analysis: dict) -> dict[UnitKey, dict[str, tuple[QKOption, int, float]]]:
    """For every dense W_q / W_k unit of `layers` (index -> layer, on the run's device): option label ->
    (option, exact cost, distortion).

    Dense options reuse the unit's measured distortions when it has them. Without `measured.database` and
    without a transform, large projections are measured on `measured_rows` (one subset for every
    option, so options compare on equal terms); with it, each option's reconstructed projection
    (fp16, on the CPU) is stored under (unit.key, label) and every row is measured.
    """
    codec, keep, seed = run.codec, measured.database, run.seed
    out = {}
    settings = codec.candidates()
    ratios = run.recipe.qk_rank_ladder
    qk_units = [u for u in measured.units if u.layer in layers and u.qk and u.role is Role.DENSE]
    for u in qk_units:
        w = layers[u.layer].get_submodule(u.module).weight.data
        target = Target(w, analysis[u.layer].moments[u.input_group].to(run.device),
                        fisher_of_unit(run, measured.fisher, u))
        exact = keep is not None
        options = qk_options(u, settings, ratios, codec.in_features_multiple)
        dense = {s.label(): u.distortion[s.label()] for s in settings if s.label() in u.distortion}
        if exact or len(dense) < len(settings):
            dense, quantized = unit_distortions(codec, u, target, settings, seed=seed, exact=exact)
            if keep is not None:
                for s, wq in zip(settings, quantized):
                    keep[(u.key, QKOption(0, s).label)] = wq.half().cpu()
        table = {o.label: (o, option_cost(u, o, codec), dense[o.setting.label()]) for o in options if not o.rank}
        rows = measured_rows(u, w.shape[0], codec, exact=exact or not codec.rows_independent, seed=seed)
        target.svd = whitened_svd(target.w.float(), target.xtx.double())
        for rank in dict.fromkeys(o.rank for o in options if o.rank):
            for s, (d, product) in zip(settings, lowrank_distortions(codec, u, rank, target, seed, rows=rows)):
                o = QKOption(rank, s)
                table[o.label] = (o, option_cost(u, o, codec), d)
                if keep is not None:
                    keep[(u.key, o.label)] = product.half().cpu()
        out[u.key] = table
    return out
