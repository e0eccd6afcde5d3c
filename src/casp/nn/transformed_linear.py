"""`TransformedLinear`: a linear quantized in a rotated basis, y = out_inverse(inner(in_forward(x))) + b.

`inner` is the quantized matrix W' = U W Vᵀ (any casp module, usually a `PackedLinear` without
bias); the transform's stored tensors are buffers of this module, so they are saved, loaded and
counted like every other stored bit.
"""
from __future__ import annotations

import torch
from torch import nn

from casp.transforms.base import TransformParams, get_transform_class

_PREFIX = "transform_"


class TransformedLinear(nn.Module):
    """Drop-in for `nn.Linear` whose weight is stored in a transformed basis."""

    def __init__(self, inner: nn.Module, params: TransformParams, bias: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.meta = dict(params.meta)
        self.in_features = int(self.meta["in_features"])
        self.out_features = int(self.meta["out_features"])
        self._names = tuple(params.tensors)
        for name, t in params.tensors.items():
            self.register_buffer(_PREFIX + name, t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def transform(self):
        return get_transform_class(self.meta["name"])

    def params(self) -> TransformParams:
        return TransformParams({n: getattr(self, _PREFIX + n) for n in self._names}, dict(self.meta))

    def transform_bits(self) -> int:
        """Stored bits of the transform itself (tensors and declared seed bits)."""
        tensors = sum(getattr(self, _PREFIX + n).numel() * getattr(self, _PREFIX + n).element_size() * 8
                      for n in self._names)
        return tensors + int(self.meta.get("seed_bits", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, p = self.transform, self.params()
        y = cls.out_inverse(p.tensors, p.meta, self.inner(cls.in_forward(p.tensors, p.meta, x)))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def casp_spec(self) -> dict:
        return {"type": "transformed", "bias": self.bias is not None, "transform": dict(self.meta)}

    @classmethod
    def from_spec(cls, spec: dict) -> TransformedLinear:
        meta = spec["transform"]
        tensors = get_transform_class(meta["name"]).empty_tensors(meta)
        bias = torch.zeros(int(meta["out_features"])) if spec["bias"] else None
        return cls(nn.Identity(), TransformParams(tensors, meta), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transform={self.meta['name']}"
