"""The codec of a run: its quantizer under its weight transform, as one object.

Everything the plan, the allocator and the layer pass ask of "how a matrix is stored" goes through
it: the candidate settings (less those the recipe leaves out), the exact stored bits of a setting
(the quantizer's format plus the transform's parameters), quantizing, and dequantizing many
settings with shared work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.steps.quantize import dequantize_unit_many, quantize_unit


@dataclass(frozen=True)
class Codec:
    """quantizer ∘ transform; `transform` is None when the weights are quantized as they are."""

    quantizer: object
    transform: object | None = None
    excluded: tuple[str, ...] = ()

    @classmethod
    def of(cls, recipe) -> "Codec | None":
        """The recipe's codec, or None when nothing is quantized (`--quantizer none`)."""
        quantizer = recipe.build_quantizer()
        if quantizer is None:
            return None
        return cls(quantizer, recipe.build_transform(), tuple(recipe.excluded_candidates))

    @property
    def in_features_multiple(self) -> int:
        return self.quantizer.in_features_multiple

    @property
    def rows_independent(self) -> bool:
        """Rows are quantized independently given XᵀX (a transform mixes them)."""
        return self.quantizer.rows_independent and self.transform is None

    def candidates(self) -> list:
        return [s for s in self.quantizer.candidates() if s.label() not in self.excluded]

    def uniform_setting(self, bits: float):
        return self.quantizer.uniform_setting(bits)

    def setting_type(self) -> type:
        return type(self.quantizer.candidates()[0])

    def stored_bits(self, setting, out_features: int, in_features: int) -> int:
        """Exact stored bits of a matrix at a setting: the quantizer's format plus the transform's parameters."""
        bits = self.quantizer.stored_bits(setting, out_features, in_features)
        if self.transform is not None:
            bits += self.transform.stored_bits(out_features, in_features)
        return bits

    def quantize(self, w: torch.Tensor, h: torch.Tensor, setting, seed: int):
        """(stored form, dequantized float32 weight in the original basis, transform params or None)."""
        return quantize_unit(w, h, setting, self.quantizer, self.transform, seed)

    def dequantize_many(self, w: torch.Tensor, h: torch.Tensor, settings, seed: int) -> list[torch.Tensor]:
        """The dequantized float32 weight (original basis) at each setting, with shared work."""
        return dequantize_unit_many(w, h, settings, self.quantizer, self.transform, seed)
