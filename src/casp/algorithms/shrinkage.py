"""Layer effects measured on a few shared samples, shrunk toward their mean by how much of their spread is noise.

`log_ratios[i, r]` is log(measured KL / estimated damage) of layer i on held-out sample r. Every layer is
measured on the same samples, so a sample that is hard for one layer is hard for all: the samples' own effect
cancels between layers, and only the layer × sample interaction is noise (a two-way layout without
replication). The layer effects are the row means; the part of their spread the interaction explains is
removed, empirical-Bayes style: each effect is pulled toward the mean by the factor
τ² / (τ² + σ² / R), where τ² is the spread beyond noise and σ² / R the noise of a row mean. When the layers
differ by no more than the noise the factor is 0, every layer gets the same scale and the per-matrix estimate
decides alone; when they differ far beyond it the factor is near 1 and the measurements stand.
"""
from __future__ import annotations

import torch


def shrink_layer_effects(log_ratios: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(each layer's shrunk effect [L], the factor applied) from `log_ratios` [L layers, R samples].

    With one layer or one sample there is no noise to measure, and the row means are returned (factor 1).
    """
    x = log_ratios.double()
    n_layers, n_samples = x.shape
    effects = x.mean(1)
    if n_layers < 2 or n_samples < 2:
        return effects, 1.0
    residual = x - effects[:, None] - x.mean(0)[None, :] + x.mean()
    noise = float((residual ** 2).sum()) / ((n_layers - 1) * (n_samples - 1)) / n_samples
    spread = float(effects.var(unbiased=True))
    signal = max(spread - noise, 0.0)
    factor = signal / (signal + noise) if signal + noise > 0 else 1.0
    centre = effects.mean()
    return centre + factor * (effects - centre), factor
