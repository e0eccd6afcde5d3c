"""Attention statistics of a decoder layer, measured from its own q/k projections.

Given the normed attention inputs caught while a layer runs, rebuild q and k (original
and, optionally, low-rank), apply the family's RoPE, and measure per-head density, the
error of the attention map after compressing W_q/W_k, and our bound on that error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention as attn_math
from .adapters import Adapter


@dataclass
class LayerAttentionStats:
    density: list[float]                 # per head
    map_mse: float | None = None         # MSE(S - S') after low-rank Q/K
    row_l1: float | None = None          # mean row L1 error
    bound_l1: float | None = None        # our bound on the mean row L1 error
    extra: dict = field(default_factory=dict)

    @property
    def mean_density(self) -> float:
        return float(sum(self.density) / len(self.density))


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
    acc = attn_math.DensityAccumulator(mass=mass)
    mse_sum = l1_sum = bound_sum = 0.0
    rows = 0
    for x, pos in attn_inputs:
        q, k = _qk(x.float(), q_mod, k_mod, attention, adapter, geometry, pos)
        p = attn_math.attention_probs(q, k)
        acc.add(p)
        if lowrank is not None:
            q2, k2 = _qk(x.float(), lowrank[0], lowrank[1], attention, adapter, geometry, pos)
            p2 = attn_math.attention_probs(q2, k2)
            n = p.shape[0] * p.shape[1] * p.shape[2]
            mse_sum += attn_math.attention_map_error(p, p2) * n
            l1_sum += attn_math.row_l1_error(p, p2) * n
            bound_sum += attn_math.layer_bound(q, k, q2, k2) * n
            rows += n
    stats = LayerAttentionStats(density=[float(v) for v in acc.result()])
    if lowrank is not None and rows:
        stats.map_mse = mse_sum / rows
        stats.row_l1 = l1_sum / rows
        stats.bound_l1 = bound_sum / rows
    return stats
