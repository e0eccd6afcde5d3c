"""The weight-transform stage: orthogonal maps on both sides of W, applied before quantization.

For W (out × in) a transform gives orthogonal U (out × out) and V (in × in); the quantizer sees
W' = U W Vᵀ and the matching second moment H' = V H Vᵀ, so its loss tr(Δ'H'Δ'ᵀ) equals the
loss in the original basis. At inference y = x Wᵀ ≈ out_inverse(Q'(in_forward(x))), with
in_forward(x) = x Vᵀ and out_inverse(z) = z U: the module `casp.nn.TransformedLinear` does that.

A transform is one module: a `WeightTransform` subclass with `build` (the stored parameters of one
matrix), `stored_bits` (their exact cost for a shape, seeds included), `empty_tensors` (to load
into) and the four side maps, registered with `@register_transform`; `tunable` opts stored tensors
into fine-tuning.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from casp.quant.base import Configurable


@dataclass
class TransformParams:
    """Stored parameters of one matrix's transform: tensors, and meta (with the transform's name)."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


class WeightTransform(Configurable, ABC):
    """Base class; the side maps act on the last dimension and are their own adjoints' inverses.

    `tunable` names the stored tensors that fine-tuning may change (the side maps are differentiable in
    them); the inverse maps are then the adjoints, which is what the forward pass computes.
    """

    tunable: ClassVar[tuple[str, ...]] = ()
    # a transform that builds the same rotation as another (only its storage differs) measures the same
    # damages, so runs with either share one measured plan (`Recipe.measurement_key`)
    measures_as: ClassVar[str | None] = None

    @abstractmethod
    def build(self, out_features: int, in_features: int, seed: int) -> TransformParams:
        """The parameters for one matrix; meta must hold name, out_features, in_features."""

    @abstractmethod
    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Exact stored bits of `build`'s parameters for this shape (tensors and seeds)."""

    @staticmethod
    def describe(meta: dict) -> dict:
        """Report fields of one matrix's transform (how it was built, for the per-matrix report)."""
        return {"transform": meta["name"]}

    @staticmethod
    @abstractmethod
    def empty_tensors(meta: dict) -> dict[str, torch.Tensor]:
        """Tensors of the stored shapes, to load a state dict into."""

    @staticmethod
    @abstractmethod
    def in_forward(tensors: dict, meta: dict, x: torch.Tensor) -> torch.Tensor:
        """x Vᵀ over the last dim (size in_features)."""

    @staticmethod
    @abstractmethod
    def in_inverse(tensors: dict, meta: dict, x: torch.Tensor) -> torch.Tensor:
        """x V over the last dim (size in_features)."""

    @staticmethod
    @abstractmethod
    def out_forward(tensors: dict, meta: dict, z: torch.Tensor) -> torch.Tensor:
        """z Uᵀ over the last dim (size out_features)."""

    @staticmethod
    @abstractmethod
    def out_inverse(tensors: dict, meta: dict, z: torch.Tensor) -> torch.Tensor:
        """z U over the last dim (size out_features)."""


def transform_weight(cls: type[WeightTransform], p: TransformParams, w: torch.Tensor) -> torch.Tensor:
    """W' = U W Vᵀ."""
    rows = cls.in_forward(p.tensors, p.meta, w)
    return cls.out_forward(p.tensors, p.meta, rows.t()).t().contiguous()


# Rows of XᵀX transformed per piece: a transform's temporaries then stay a few pieces in size, not a few copies
# of H (an 11008² float64 XᵀX is 0.97 GB).
XTX_PIECE_ELEMENTS = 1 << 22


def transform_xtx(cls: type[WeightTransform], p: TransformParams, h: torch.Tensor) -> torch.Tensor:
    """H' = V H Vᵀ (in h's dtype): V applied to the rows of H, then to the rows of (H Vᵀ)ᵀ, by pieces of rows
    written into their place. Two n × n results live beside H, whatever the transform does inside."""
    n = h.shape[0]
    step = max(1, XTX_PIECE_ELEMENTS // max(n, 1))
    hv = torch.empty_like(h, memory_format=torch.contiguous_format)
    for i in range(0, n, step):
        hv[i:i + step] = cls.in_forward(p.tensors, p.meta, h[i:i + step])
    out = torch.empty_like(hv)
    for i in range(0, n, step):
        out[:, i:i + step] = cls.in_forward(p.tensors, p.meta, hv[:, i:i + step].t()).t()
    return out


def restore_weight(cls: type[WeightTransform], p: TransformParams, w: torch.Tensor) -> torch.Tensor:
    """W = Uᵀ W' V: a weight in the transformed basis mapped back to the original one."""
    rows = cls.in_inverse(p.tensors, p.meta, w)
    return cls.out_inverse(p.tensors, p.meta, rows.t()).t().contiguous()


_TRANSFORMS: dict[str, type[WeightTransform]] = {}


def register_transform(cls: type[WeightTransform]) -> type[WeightTransform]:
    _TRANSFORMS[cls.name] = cls
    return cls


def get_transform_class(name: str) -> type[WeightTransform]:
    if name not in _TRANSFORMS:
        import casp.transforms  # noqa: F401  (built-ins register themselves)
    if name not in _TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; known: {', '.join(sorted(_TRANSFORMS)) or 'none'}")
    return _TRANSFORMS[name]


def available_transforms() -> list[str]:
    import casp.transforms  # noqa: F401  (built-ins register themselves)

    return sorted(_TRANSFORMS)
