"""Step: turn one unit into its stored module: low-rank factors, optional transform, then the quantizer."""
from __future__ import annotations

import zlib

import torch
from torch import nn

from casp.algorithms.lowrank import factor_input_xtx, whitened_lowrank
from casp.models.adapters import Adapter
from casp.nn.base import dense_weight_of
from casp.nn.lowrank_linear import LowRankLinear
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear
from casp.steps.units import Role, Unit
from casp.transforms.base import restore_weight, transform_weight, transform_xtx

FP16_BITS = 16


def factorise(layer: nn.Module, adapter: Adapter, ranks: dict[str, int], xtx_attn: torch.Tensor) -> dict[str, LowRankLinear]:
    """Whitened low-rank W_q / W_k of one layer (dotted name -> module); only where the rank is > 0."""
    out = {}
    for p in ("q", "k"):
        r = ranks.get(p, 0)
        if not r:
            continue
        lin = layer.get_submodule(adapter.qk_name(p))
        a, b = whitened_lowrank(lin.weight.data.float(), xtx_attn, r)
        bias = lin.bias.data.clone() if lin.bias is not None else None
        out[adapter.qk_name(p)] = LowRankLinear.from_factors(a, b, bias)
    return out


def unit_weight_and_xtx(unit: Unit, layer: nn.Module, lowrank: dict, moments: dict):
    """The matrix a unit stores, and the XᵀX of its input (for `up`: that of B·x, with B the `down`
    factor as it is stored by then: plain, packed or transformed)."""
    if unit.role is Role.UP:
        lr = lowrank[unit.module]
        w_down = dense_weight_of(lr.down)
        h = moments[unit.input_group]
        return lr.up.weight.data, factor_input_xtx(w_down.to(h.dtype), h)
    if unit.role is Role.DOWN:
        return lowrank[unit.module].down.weight.data, moments[unit.input_group]
    return layer.get_submodule(unit.name).weight.data, moments[unit.input_group]


def transform_seed(seed: int, unit: Unit) -> int:
    """A per-unit seed, stable across runs: the transform of a matrix never depends on run order."""
    return zlib.crc32(f"{seed}:{unit.key}".encode())


def in_basis(w: torch.Tensor, h: torch.Tensor, transform, seed: int):
    """(W, XᵀX) in the transform's basis (float32), its parameters, and the map back to the original basis."""
    if transform is None:
        return w.float(), h.float(), None, lambda d: d
    cls = type(transform)
    params = transform.build(w.shape[0], w.shape[1], seed)
    wt = transform_weight(cls, params, w.float())
    ht = transform_xtx(cls, params, h.double()).to(h.dtype)
    return wt, ht.float(), params, lambda d: restore_weight(cls, params, d)


def quantize_unit(w: torch.Tensor, h: torch.Tensor, setting, quantizer, transform=None, seed: int = 0):
    """(stored form, dequantized float32 weight in the original basis, transform params or None)."""
    return quantize_hinted_unit(w, h, setting, (quantizer, transform, seed), None)


def quantize_hinted_unit(w: torch.Tensor, h: torch.Tensor, setting, coder: tuple, hint: dict | None):
    """`quantize_unit` with `coder` = (quantizer, transform or None, seed), given `hint`: what the plan's sweep chose for
    this matrix at `setting` (`Quantizer.quantize_hinted`)."""
    quantizer, transform, seed = coder
    wt, ht, params, back = in_basis(w, h, transform, seed)
    qw, deq = quantizer.quantize_hinted(wt, ht, setting, hint)
    return qw, back(deq), params


def dequantize_unit_many(w: torch.Tensor, h: torch.Tensor, settings, quantizer, transform=None,
                         seed: int = 0) -> list[torch.Tensor]:
    """The dequantized float32 weight (original basis) at each setting: `quantize_unit`'s, with shared work."""
    wt, ht, _, back = in_basis(w, h, transform, seed)
    return [back(d) for d in quantizer.dequantize_many(wt, ht, settings)]


def stored_module(qw, params, bias: torch.Tensor | None) -> nn.Module:
    """The inference module of a quantized unit: packed, wrapped by its transform when there is one."""
    if params is None:
        return PackedLinear.from_quantized(qw, bias)
    return TransformedLinear(PackedLinear.from_quantized(qw), params, bias)


def stored_unit(run, u: Unit, w, h, setting, bias) -> tuple:
    """(stored module, report row) of matrix `w` of unit `u` quantized at `setting` by the run's codec."""
    codec = run.codec
    qw, _, params = codec.quantize(w, h, setting, transform_seed(run.seed, u), u.hints.get(setting.label()))
    module = stored_module(qw, params, bias)
    stored = qw.stored_bits() + (module.transform_bits() if params is not None else 0)
    row = unit_row(run, u)
    if params is not None:
        row.update(type(codec.transform).describe(params.meta))
    return module, {**row, "setting": setting.label(), **setting.describe(), "stored_bits": stored,
                    "bits_per_weight": stored / max(u.num_weights, 1), "distortion": u.distortion.get(setting.label())}


def unit_row(run, u: Unit) -> dict:
    """The report fields that describe unit `u` itself."""
    return {"name": f"{run.adapter.layers}.{u.layer}.{u.name}", "layer": u.layer, "rank": u.rank,
            "num_weights": u.num_weights, "out_features": u.out_features, "in_features": u.in_features}
