"""Incoherence with real-valued sides (QuIP#'s fine-tuned SU / SV): `--transform incoherence-scaled`.

The same randomized Hadamard transform as `incoherence`, and at quantization the same matrix: the two
diagonal vectors start as the same ±1 signs from the same seed, so the quantizer sees the same W' and
picks the same codes. They are stored as fp16 vectors (16 bits per row and per column, counted like
every other stored bit) instead of 1 bit per sign, so fine-tuning (`--finetune-steps`, `--e2e-steps`)
may tune them (`tunable`): the module then computes y = diag(s_out)·M_outᵀ·W'·M_in·diag(s_in)·x, a per-row and
per-column scale around the fixed codes, which is the room QuIP#'s fine-tuning uses. Without
fine-tuning it only costs bits. Its measured plan is incoherence's (`measures_as`): only the stored
bits of each candidate differ, and the allocation counts those itself.
"""
from __future__ import annotations

import torch

from casp.transforms.base import TransformParams, register_transform
from casp.transforms.incoherence import Incoherence, _signs, seed_bits

SCALE_DTYPE = torch.float16


@register_transform
class ScaledIncoherence(Incoherence):
    """Randomized Hadamard incoherence whose diagonal sides are stored as tunable fp16 vectors."""

    name = "incoherence-scaled"
    tunable = ("scales_out", "scales_in")
    measures_as = "incoherence"   # the same W' and XᵀX at quantization: the same measured plan

    def build(self, out_features: int, in_features: int, seed: int) -> TransformParams:
        p = super().build(out_features, in_features, seed)
        tensors = {f"scales_{side}": _signs(p.tensors[f"signs_{side}"], size, SCALE_DTYPE)
                   for side, size in (("out", out_features), ("in", in_features))}
        return TransformParams(tensors, {**p.meta, "name": self.name})

    def stored_bits(self, out_features: int, in_features: int) -> int:
        return 16 * (out_features + in_features) + seed_bits(out_features, in_features)

    @staticmethod
    def empty_tensors(meta: dict) -> dict[str, torch.Tensor]:
        return {"scales_out": torch.zeros(int(meta["out_features"]), dtype=SCALE_DTYPE),
                "scales_in": torch.zeros(int(meta["in_features"]), dtype=SCALE_DTYPE)}

    @staticmethod
    def diagonal(tensors: dict, meta: dict, side: str, dtype: torch.dtype) -> torch.Tensor:
        """The stored real-valued vector of one side."""
        return tensors[f"scales_{side}"].to(dtype)
