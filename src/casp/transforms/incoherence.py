"""Incoherence processing (QuIP#'s randomized Hadamard transform) as a weight transform.

U = M_m·diag(s_U) and V = M_n·diag(s_V), with s_U, s_V random ±1 vectors from the per-matrix seed
and M_k the orthonormal fast transform of size k: (H_K ⊗ H_p)/√k when k = K·p has a Hadamard
factorisation (`casp.algorithms.hadamard.hadamard_factor`), otherwise the seeded random orthogonal
blocks of `block_orthogonal_transform`. The quantizer then sees W' = U W Vᵀ, whose entries are
spread evenly (a single outlier is smeared over a whole row and column), and H' = V H Vᵀ.

Stored: the two sign vectors packed 1 bit per sign (int32 words, rows padded to 32 signs), and
when either side uses the fallback, the 64-bit seed it is regenerated from (meta["seed"], counted
through meta["seed_bits"]). meta["kind_out"] / meta["kind_in"] say "hadamard" or "block-orthogonal",
and meta["factor_out"] / meta["factor_in"] pin the small factor (K of H_K ⊗ H_p, or the orthogonal
block b) so that a saved model keeps its matrices if more Hadamard orders are added later.
"""
from __future__ import annotations

from functools import partial

import torch

from casp.algorithms.hadamard import (
    block_orthogonal_layout, block_orthogonal_transform, hadamard_factor, hadamard_transform,
)
from casp.quant.packing import pack_codes, packed_bits, packed_words, unpack_codes
from casp.transforms.base import TransformParams, WeightTransform, register_transform

HADAMARD = "hadamard"
BLOCK_ORTHOGONAL = "block-orthogonal"
SEED_BITS = 64
_SEED_MASK = (1 << 63) - 1


def side_kind(size: int) -> str:
    """Which construction a side of this size uses."""
    return HADAMARD if hadamard_factor(size) is not None else BLOCK_ORTHOGONAL


def seed_bits(out_features: int, in_features: int) -> int:
    """Bits of the stored fallback seed: SEED_BITS when either side uses the block-orthogonal fallback."""
    return SEED_BITS if BLOCK_ORTHOGONAL in (side_kind(out_features), side_kind(in_features)) else 0


def _side_meta(side: str, size: int) -> dict:
    """kind_<side>, and the small factor it uses (K of H_K, or the orthogonal block b), pinned in meta."""
    fac = hadamard_factor(size)
    if fac is not None:
        return {f"kind_{side}": HADAMARD, f"factor_{side}": fac[0]}
    return {f"kind_{side}": BLOCK_ORTHOGONAL, f"factor_{side}": block_orthogonal_layout(size)[1]}


def _side_seed(seed: int, side: str) -> int:
    """The fallback seed of one side, derived from the stored matrix seed."""
    return (int(seed) * 2 + (side == "in")) & _SEED_MASK


def _signs(packed: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """±1 vector of `size` from its packed bits (bit 1 → −1)."""
    bits = unpack_codes(packed, 1, size, dtype=torch.uint8)[0]
    return 1 - 2 * bits.to(dtype)


def _side(s: torch.Tensor, meta: dict, side: str, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x·(M·diag(s))ᵀ, or x·M·diag(s) when inverse, over the last dim of one side."""
    size = int(meta[f"{side}_features"])
    if x.shape[-1] != size:
        raise ValueError(f"incoherence {side} side expects last dim {size}, got {x.shape[-1]}")
    s = s.to(device=x.device, dtype=x.dtype)
    factor = int(meta[f"factor_{side}"])
    if meta[f"kind_{side}"] == HADAMARD:
        apply = partial(hadamard_transform, order=factor)
    else:
        apply = partial(block_orthogonal_transform, seed=_side_seed(meta["seed"], side), block=factor)
    if inverse:
        return apply(x, transpose=True) * s
    return apply(x * s, transpose=False)


@register_transform
class Incoherence(WeightTransform):
    """Randomized Hadamard transform on both sides of W (random orthogonal blocks where no H fits)."""

    name = "incoherence"

    def build(self, out_features: int, in_features: int, seed: int) -> TransformParams:
        gen = torch.Generator().manual_seed(int(seed) & _SEED_MASK)
        bits_out = torch.randint(0, 2, (1, out_features), generator=gen, dtype=torch.int64)
        bits_in = torch.randint(0, 2, (1, in_features), generator=gen, dtype=torch.int64)
        meta = {"name": self.name, "out_features": out_features, "in_features": in_features,
                **_side_meta("out", out_features), **_side_meta("in", in_features)}
        if seed_bits(out_features, in_features):
            meta["seed"] = int(seed) & _SEED_MASK
            meta["seed_bits"] = SEED_BITS
        return TransformParams({"signs_out": pack_codes(bits_out, 1), "signs_in": pack_codes(bits_in, 1)}, meta)

    def stored_bits(self, out_features: int, in_features: int) -> int:
        return packed_bits(1, out_features, 1) + packed_bits(1, in_features, 1) + seed_bits(out_features, in_features)

    @staticmethod
    def describe(meta: dict) -> dict:
        """Which construction each side used: "hadamard", or the "block-orthogonal" fallback."""
        return {"transform": meta["name"], "transform_out": meta["kind_out"], "transform_in": meta["kind_in"]}

    @staticmethod
    def empty_tensors(meta: dict) -> dict[str, torch.Tensor]:
        return {"signs_out": torch.zeros(1, packed_words(int(meta["out_features"]), 1), dtype=torch.int32),
                "signs_in": torch.zeros(1, packed_words(int(meta["in_features"]), 1), dtype=torch.int32)}

    @staticmethod
    def diagonal(tensors: dict, meta: dict, side: str, dtype: torch.dtype) -> torch.Tensor:
        """The vector s of diag(s) on one side: here the stored ±1 signs."""
        return _signs(tensors[f"signs_{side}"], int(meta[f"{side}_features"]), dtype)

    @classmethod
    def _map(cls, tensors: dict, meta: dict, side: str, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """One side's map (`_side`) with that side's diagonal as this class stores it."""
        return _side(cls.diagonal(tensors, meta, side, x.dtype), meta, side, x, inverse)

    @classmethod
    def in_forward(cls, tensors: dict, meta: dict, x: torch.Tensor) -> torch.Tensor:
        return cls._map(tensors, meta, "in", x, inverse=False)

    @classmethod
    def in_inverse(cls, tensors: dict, meta: dict, x: torch.Tensor) -> torch.Tensor:
        return cls._map(tensors, meta, "in", x, inverse=True)

    @classmethod
    def out_forward(cls, tensors: dict, meta: dict, z: torch.Tensor) -> torch.Tensor:
        return cls._map(tensors, meta, "out", z, inverse=False)

    @classmethod
    def out_inverse(cls, tensors: dict, meta: dict, z: torch.Tensor) -> torch.Tensor:
        return cls._map(tensors, meta, "out", z, inverse=True)
