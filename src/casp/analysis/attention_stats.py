"""Attention statistics of a decoder layer, measured from its own q/k projections.

Given the normed attention inputs caught while a layer runs, rebuild q and k (original
and, optionally, low-rank), apply the family's RoPE, and measure per-head density, the
error of the attention map after compressing W_q/W_k, and our bound on that error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from casp.algorithms import attention as attn_math
from casp.models.adapters import Adapter


@dataclass
class LayerAttentionStats:
    density: list[float]                 # per head
    map_mse: float | None = None         # MSE(S - S') after low-rank Q/K
    map_mse_bound: float | None = None   # our bound on that MSE
    row_l1: float | None = None          # mean row L1 error
    bound_l1: float | None = None        # our bound on the mean row L1 error
    extra: dict = field(default_factory=dict)

    @property
    def mean_density(self) -> float:
        return float(sum(self.density) / len(self.density))

    def as_report(self) -> dict:
        """The per-layer fields of report.json and `casp sparsity --json`."""
        return {"density_per_head": self.density, "density": self.mean_density, "attn_map_mse": self.map_mse,
                "attn_row_l1": self.row_l1, "attn_bound_l1": self.bound_l1, "attn_map_mse_bound": self.map_mse_bound}


def _qk(x, q_mod: nn.Module, k_mod: nn.Module, attention: nn.Module, adapter: Adapter, geometry, pos):
    heads, kv, hd = geometry
    b, t, _ = x.shape
    q = q_mod(x).view(b, t, heads, hd).transpose(1, 2)
    k = k_mod(x).view(b, t, kv, hd).transpose(1, 2)
    if pos is not None:
        q, k = adapter.apply_rope(attention, q, k, pos)
    return q.transpose(1, 2), k.transpose(1, 2)


@torch.no_grad()
def layer_attention_stats(
    layer: nn.Module,
    adapter: Adapter,
    geometry: tuple[int, int, int],
    attn_inputs: list[tuple[torch.Tensor, object]],
    mass: float = 0.9,
    lowrank: tuple[nn.Module, nn.Module] | None = None,
) -> LayerAttentionStats:
    """Density per head; with `lowrank=(q', k')` also the map error and our bound, on the same inputs."""
    attention = layer.get_submodule(adapter.attention)
    q_mod = layer.get_submodule(adapter.q_proj)
    k_mod = layer.get_submodule(adapter.k_proj)
    if lowrank is None:
        acc = attn_math.DensityAccumulator(mass=mass)
        for x, pos in attn_inputs:
            q, k = _qk(x.float(), q_mod, k_mod, attention, adapter, geometry, pos)
            acc.add(0, attn_math.attention_probs(q, k))
        return LayerAttentionStats(density=acc.head_density(0).tolist())
    total = attn_math.AttentionErrorStats()
    for x, pos in attn_inputs:
        q, k = _qk(x.float(), q_mod, k_mod, attention, adapter, geometry, pos)
        q2, k2 = _qk(x.float(), lowrank[0], lowrank[1], attention, adapter, geometry, pos)
        total = total + attn_math.attention_error_stats(q, k, q2, k2, mass=mass)
    return LayerAttentionStats(density=total.head_density().tolist(), map_mse=total.mse,
                               map_mse_bound=total.mse_bound, row_l1=total.mean_row_l1,
                               bound_l1=total.mean_row_l1_bound)
