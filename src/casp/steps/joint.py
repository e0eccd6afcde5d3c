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
from tqdm.auto import tqdm

from casp.algorithms.distortion import weighted_distortion
from casp.algorithms.lowrank import factor_input_xtx, rank_for_ratio, whitened_lowrank
from casp.models.adapters import Adapter
from casp.steps.costs import unit_cost
from casp.steps.quantize import quantize_unit, transform_seed
from casp.steps.units import Role, Unit

DEFAULT_RATIOS = (0.5, 0.25, 0.125)
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


def option_cost(unit: Unit, option: QKOption, quantizer, transform=None) -> int:
    """Exact stored bits of a projection under an option."""
    if not option.rank:
        return unit_cost(unit, option.setting, quantizer, transform)
    down = Unit(unit.layer, unit.module, Role.DOWN, unit.input_group, option.rank, unit.in_features, 0, unit.qk)
    up = Unit(unit.layer, unit.module, Role.UP, unit.input_group, unit.out_features, option.rank, 0, unit.qk)
    return unit_cost(down, option.setting, quantizer, transform) + unit_cost(up, option.setting, quantizer, transform)


def option_distortion(unit: Unit, option: QKOption, w: torch.Tensor, h: torch.Tensor, fisher, quantizer,
                      transform=None, seed: int = 0, factors=None) -> tuple[float, torch.Tensor]:
    """Fisher-weighted output distortion of the projection as stored under `option`, and that weight."""
    w = w.float()
    if not option.rank:
        _, wq, _ = quantize_unit(w, h, option.setting, quantizer, transform, transform_seed(seed, unit))
        return weighted_distortion(wq - w, h, fisher), wq
    a, b = factors if factors is not None else whitened_lowrank(w, h.double(), option.rank)
    down = Unit(unit.layer, unit.module, Role.DOWN, unit.input_group, option.rank, unit.in_features, 0, unit.qk)
    up = Unit(unit.layer, unit.module, Role.UP, unit.input_group, unit.out_features, option.rank, 0, unit.qk)
    _, bq, _ = quantize_unit(b.float(), h, option.setting, quantizer, transform, transform_seed(seed, down))
    h_up = factor_input_xtx(bq.to(h.dtype), h)
    _, aq, _ = quantize_unit(a.float(), h_up, option.setting, quantizer, transform, transform_seed(seed, up))
    product = aq.double() @ bq.double()
    return weighted_distortion(product - w.double(), h, fisher), product.float()


def measure_qk_options(layers, adapter: Adapter, units: list[Unit], analysis, fisher: dict | None, quantizer,
                       ratios=DEFAULT_RATIOS, *, transform=None, seed: int = 0, rank_multiple: int = 1,
                       keep: dict | None = None, progress: bool = True,
                       device="cpu") -> dict[str, dict[str, tuple[QKOption, int, float]]]:
    """For every dense W_q / W_k unit: option label -> (option, exact cost, distortion).

    With `keep`, also store each option's reconstructed projection (fp16, on the CPU) under (unit.key, label).
    The layers are on `device`; each XᵀX is moved there.
    """
    out = {}
    qk_units = [u for u in units if u.qk and u.role is Role.DENSE]
    for u in tqdm(qk_units, desc="joint Q/K", disable=not progress):
        w = layers[u.layer].get_submodule(u.module).weight.data
        h = analysis[u.layer].moments[u.input_group].to(device)
        f = fisher.get(f"{adapter.layers}.{u.layer}.{u.module}") if fisher else None
        factors = {}
        table = {}
        for opt in qk_options(u, quantizer.candidates(), ratios, rank_multiple):
            if opt.rank and opt.rank not in factors:
                factors[opt.rank] = whitened_lowrank(w.float(), h.double(), opt.rank)
            d, wq = option_distortion(u, opt, w, h, f, quantizer, transform, seed, factors.get(opt.rank))
            table[opt.label] = (opt, option_cost(u, opt, quantizer, transform), d)
            if keep is not None:
                keep[(u.key, opt.label)] = wq.half().cpu()
        out[u.key] = table
    return out
