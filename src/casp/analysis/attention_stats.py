"""Attention statistics of a decoder layer, measured from its own q/k projections.

Given the normed attention inputs caught while a layer runs, rebuild q and k (original
and, optionally, low-rank) exactly as the layer's attention does — through the family's
`Adapter.attention_qk`: projections, q/k norms, RoPE, score scale and sliding window — and
measure per-head density, the error of the attention map after compressing W_q/W_k, and
our bound on that error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from casp.algorithms import attention as attn_math
from casp.models.adapters import Adapter
from casp.models.placement import to_device


@dataclass
class LayerAttentionStats:
    density: list[float]                 # per head
    map_mse: float | None = None         # MSE(S - S') after low-rank Q/K
    map_mse_bound: float | None = None   # our bound on that MSE
    row_l1: float | None = None          # mean row L1 error
    bound_l1: float | None = None        # our bound on the mean row L1 error

    @property
    def mean_density(self) -> float:
        return float(sum(self.density) / len(self.density))

    def as_report(self) -> dict:
        """The per-layer fields of report.json and `casp sparsity --json`."""
        return {"density_per_head": self.density, "density": self.mean_density, "attn_map_mse": self.map_mse,
                "attn_row_l1": self.row_l1, "attn_bound_l1": self.bound_l1, "attn_map_mse_bound": self.map_mse_bound}


def _check_geometry(qk, geometry) -> None:
    heads, kv, hd = geometry
    if qk.q.shape[2:] != (heads, hd) or qk.k.shape[2:] != (kv, hd):
        raise ValueError(f"attention gives q {tuple(qk.q.shape)}, k {tuple(qk.k.shape)}; "
                         f"expected {heads} query and {kv} kv heads of size {hd}")


@torch.no_grad()
def layer_attention_stats(
    layer: nn.Module,
    adapter: Adapter,
    geometry: tuple[int, int, int],
    attn_inputs: list[tuple[torch.Tensor, object]],
    mass: float = 0.9,
    lowrank: tuple[nn.Module, nn.Module] | None = None,
) -> LayerAttentionStats:
    """Density per head; with `lowrank=(q', k')` also the map error and our bound, on the same inputs.

    The caught inputs are moved to the layer's device one batch at a time.
    """
    attention = layer.get_submodule(adapter.attention)
    device = next(attention.parameters()).device
    attn_inputs = (to_device(pair, device) for pair in attn_inputs)
    if lowrank is None:
        acc = attn_math.DensityAccumulator(mass=mass)
        for x, pos in attn_inputs:
            qk = adapter.attention_qk(attention, x.float(), pos)
            _check_geometry(qk, geometry)
            probs = attn_math.attention_probs(qk.q, qk.k, scale=qk.scale, window=qk.window)
            valid = attn_math.key_validity(qk.q.shape[1], qk.k.shape[1], device=probs.device, window=qk.window)
            acc.add(0, probs, valid)
        return LayerAttentionStats(density=acc.head_density(0).tolist())
    total = attn_math.AttentionErrorStats()
    for x, pos in attn_inputs:
        qk = adapter.attention_qk(attention, x.float(), pos)
        _check_geometry(qk, geometry)
        qk2 = adapter.attention_qk(attention, x.float(), pos, q_proj=lowrank[0], k_proj=lowrank[1])
        total = total + attn_math.attention_error_stats(qk.q, qk.k, qk2.q, qk2.k, mass=mass,
                                                        scale=qk.scale, window=qk.window)
    return LayerAttentionStats(density=total.head_density().tolist(), map_mse=total.mse,
                               map_mse_bound=total.mse_bound, row_l1=total.mean_row_l1,
                               bound_l1=total.mean_row_l1_bound)


@torch.no_grad()
def layer_visual_density(layer: nn.Module, adapter: Adapter, attn_inputs: list[tuple[torch.Tensor, object]],
                         visual: list[torch.Tensor], mass: float = 0.9) -> dict:
    """Density of the text queries' attention over visual against text keys, per head and averaged.

    `visual[i]` is bool [b, t]: which tokens of the i-th caught input are image tokens.
    """
    attention = layer.get_submodule(adapter.attention)
    device = next(attention.parameters()).device
    acc = attn_math.SplitDensity(mass=mass)
    for (x, pos), kind in zip(attn_inputs, visual):
        x, pos = to_device((x, pos), device)
        qk = adapter.attention_qk(attention, x.float(), pos)
        probs = attn_math.attention_probs(qk.q, qk.k, scale=qk.scale, window=qk.window)
        valid = attn_math.key_validity(qk.q.shape[1], qk.k.shape[1], device=probs.device, window=qk.window)
        acc.add(probs, kind, valid)
    visual_d, text_d, share = (acc.per_head(n) for n in ("kind", "rest", "share"))
    return {"visual_density": float(visual_d.mean()), "text_density": float(text_d.mean()),
            "visual_mass_share": float(share.mean()), "visual_density_per_head": visual_d.tolist(),
            "text_density_per_head": text_d.tolist(), "text_query_rows": acc.rows}
