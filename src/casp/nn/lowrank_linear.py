"""`LowRankLinear`: a projection replaced by two factors, y = up(down(x)), as a real module."""
from __future__ import annotations

import torch
from torch import nn

from casp.algorithms.lowrank import check_rank
from casp.nn.base import CaspLinear, dense_weight_of


class LowRankLinear(CaspLinear, kind="lowrank"):
    """y = up(down(x)): a rank-r stand-in for an m×n `nn.Linear`, bias (if any) on `up`.

    `down` (n→r) holds B and `up` (r→m) holds A. Both are plain `nn.Linear`s and `forward` only
    calls them, so a quantizer can swap either child for a packed module.
    """

    runs_as_dense = False   # r·(m + n) multiply-adds per row, fewer than A·B's m·n

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_rank(out_features, in_features, rank)
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(in_features, rank, bias=False, **kw)
        self.up = nn.Linear(rank, out_features, bias=bias, **kw)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> LowRankLinear:
        """Module with up.weight = A (m×r), down.weight = B (r×n) and the given output bias."""
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"factors A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
        m, r = a.shape
        n = b.shape[1]
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {m} outputs")
        dtype = dtype or a.dtype
        mod = cls(n, m, r, bias=bias is not None, device=a.device, dtype=dtype)
        with torch.no_grad():
            mod.up.weight.copy_(a.to(dtype))
            mod.down.weight.copy_(b.to(dtype))
            if bias is not None:
                mod.up.bias.copy_(bias.to(dtype))
        return mod

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """A·B (m×n), from the factors' own dense weights (plain, packed or transformed)."""
        return dense_weight_of(self.up) @ dense_weight_of(self.down)

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.up.bias is None else self.up.bias.detach()

    def spec(self) -> dict:
        """Rank, shape, and whether `up` has a bias (the factors have their own specs once quantized)."""
        return {"type": self.kind, "rank": self.rank, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.up.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
