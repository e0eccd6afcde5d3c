"""A layer's compressed linears run as plain dense ones for a while: each decoded once, not once per call.

A layer walk runs one decoder layer on every calibration batch (128 of them at the defaults). A packed
module rebuilds its weight slab by slab on every call, and a transformed one also maps every row of its
input and output, so the same decoding is repeated once per batch. Decoded once into an `nn.Linear`-like
stand-in, the layer runs at dense speed and computes the same function (up to float rounding).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from casp.nn.base import CaspLinear


class DecodedLinear(nn.Module):
    """y = x Wᵀ + b with the dense weight and bias of a casp module (cast to the input's dtype)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)


def _swappable(module: nn.Module) -> bool:
    """An outermost casp module that computes one dense matmul (not a factored one) and carries no hooks."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    return isinstance(module, CaspLinear) and module.runs_as_dense and not hooked


@contextmanager
def decoded(layer: nn.Module, enabled: bool = True):
    """Within the block, every casp module of `layer` that `_swappable` accepts is a `DecodedLinear`;
    the stored modules are put back after, untouched. For passes without gradients only."""
    swapped: list[tuple[str, nn.Module]] = []
    if enabled:
        for name, module in list(layer.named_modules()):
            if any(name.startswith(done + ".") for done, _ in swapped) or not _swappable(module):
                continue
            with torch.no_grad():
                stand_in = DecodedLinear(module.dense_weight().float(), module.dense_bias())
            swapped.append((name, module))
            layer.set_submodule(name, stand_in)
    try:
        yield layer
    finally:
        for name, module in swapped:
            layer.set_submodule(name, module)
