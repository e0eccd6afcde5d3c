"""`TransformedLinear`: a linear quantized in a rotated basis, y = out_inverse(inner(in_forward(x))) + b.

`inner` is the quantized matrix W' = U W Vᵀ (any casp module, usually a `PackedLinear` without
bias); the transform's stored tensors are buffers of this module, so they are saved, loaded and
counted like every other stored bit.

Its dense weight W = Uᵀ W' V is read off the module's own maps applied to the identity, in forward's
order: `restore_weight` gives the same matrix up to rounding, but only this order gives, bit for bit,
what the module computes (and what the `up` factor quantized after a transformed `down` was measured on).

With many rows and no gradient (prefill, teacher-forced evaluation, calibration of later layers) the
forward folds the maps into W once per call and runs one dense matmul (`_folds`).
"""
from __future__ import annotations

import torch
from torch import nn

from casp.nn.base import CaspLinear, dense_weight_of
from casp.transforms.base import TransformParams, get_transform_class, restore_weight

_PREFIX = "transform_"
FOLD_RATIO = 2   # fold the maps into a dense weight when rows·(in + out) exceeds this many times in·out


class TransformedLinear(CaspLinear, kind="transformed"):
    """Drop-in for `nn.Linear` whose weight is stored in a transformed basis."""

    prefix = _PREFIX   # attribute name of a stored transform tensor = prefix + its name

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

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias: out_inverse(inner(in_forward(x)))."""
        cls, p = self.transform, self.params()
        return cls.out_inverse(p.tensors, p.meta, self.inner(cls.in_forward(p.tensors, p.meta, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folds(x):
            return nn.functional.linear(x, self._folded_weight().to(x.dtype),
                                        None if self.bias is None else self.bias.to(x.dtype))
        y = self._maps(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def _folds(self, x: torch.Tensor) -> bool:
        """Many rows, no gradient: rebuilding W = Uᵀ W' V once (maps over out·in weights) costs less than
        the maps over every row of x and y (rows·(in + out)), and then one dense matmul does the rest."""
        rows = x.numel() // max(1, self.in_features)
        if rows * (self.in_features + self.out_features) <= FOLD_RATIO * self.in_features * self.out_features:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _folded_weight(self) -> torch.Tensor:
        """W = Uᵀ W' V from the inner module's dense weight (`restore_weight`: equal to `dense_weight` up to
        float rounding)."""
        with torch.no_grad():
            return restore_weight(self.transform, self.params(), dense_weight_of(self.inner).float())

    def dense_weight(self) -> torch.Tensor:
        """W = Uᵀ W' V (float32): the inner module's dense weight mapped back (`_folded_weight`), not the maps
        applied to an identity, which would cost a full in × in × out matmul."""
        return self._folded_weight().float()

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach()

    def spec(self) -> dict:
        """The transform's metadata, and whether there is a bias (`inner` has its own spec)."""
        return {"type": self.kind, "bias": self.bias is not None, "transform": dict(self.meta)}

    @classmethod
    def from_spec(cls, spec: dict) -> TransformedLinear:
        meta = spec["transform"]
        tensors = get_transform_class(meta["name"]).empty_tensors(meta)
        bias = torch.zeros(int(meta["out_features"])) if spec["bias"] else None
        return cls(nn.Identity(), TransformParams(tensors, meta), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transform={self.meta['name']}"
