"""The codec of a run: its quantizer under its weight transform, as one object.

Everything the plan, the allocator and the layer pass ask of "how a matrix is stored" goes through
it: the candidate settings (less those the recipe leaves out), the exact stored bits of a setting
(the quantizer's format plus the transform's parameters), quantizing, and dequantizing many
settings with shared work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.algorithms.distortion import weighted_distortion
from casp.steps.quantize import dequantize_unit_many, in_basis, quantize_hinted_unit


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
        """Rows of the original matrix are quantized independently given XᵀX (a transform mixes them)."""
        return self.quantizer.rows_independent and self.transform is None

    @property
    def samples_rows(self) -> bool:
        """A row sample estimates a matrix's damage: rows are quantized independently in the quantizer's
        basis (under a transform, the rows of U W Vᵀ), given XᵀX and the whole matrix's `row_context`."""
        return self.quantizer.rows_independent

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

    def quantize(self, w: torch.Tensor, h: torch.Tensor, setting, seed: int, hint: dict | None = None):
        """(stored form, dequantized float32 weight in the original basis, transform params or None); `hint`: what a
        sweep of this matrix chose at `setting` (`sampled_damages`)."""
        return quantize_hinted_unit(w, h, setting, (self.quantizer, self.transform, seed), hint)

    def dequantize_many(self, w: torch.Tensor, h: torch.Tensor, settings, seed: int) -> list[torch.Tensor]:
        """The dequantized float32 weight (original basis) at each setting, with shared work."""
        return dequantize_unit_many(w, h, settings, self.quantizer, self.transform, seed)

    def sampled_damages(self, target, settings, seed: int, rows: torch.Tensor,
                        hints: dict | None = None) -> list[float]:
        """Each setting's Fisher-weighted damage Σ_o F_o (ΔW H ΔWᵀ)_oo of the whole matrix `target.w` (input
        second moment `target.xtx`, Fisher `target.fisher`), estimated from `rows` of the matrix the quantizer
        sees (scaled by out / rows).

        Under a transform that matrix is W' = U W Vᵀ and the damage is Σ_ij G_ij (Δ'H'Δ'ᵀ)_ij with
        G = U diag(F) Uᵀ; the estimate keeps its diagonal, G_ii = Σ_o U_io² F_o (= mean F for a
        Hadamard U), as rounding errors of different rows are uncorrelated. With `hints`, each setting's label is
        mapped there to what the sweep chose for it (`Quantizer.sweep`), when it chose anything.
        """
        w, fisher = target.w.float(), target.fisher
        out_f = w.shape[0]
        wt, ht, params, _ = in_basis(w, target.xtx, self.transform, seed)
        rows = rows.to(wt.device)
        weights = fisher.to(wt.device).double() if fisher is not None else torch.ones(out_f, dtype=torch.float64,
                                                                                        device=wt.device)
        if params is not None:
            cls = type(self.transform)
            picked = torch.zeros(rows.numel(), out_f, dtype=torch.float64, device=wt.device)
            picked[torch.arange(rows.numel(), device=wt.device), rows] = 1.0   # rows of the identity, not all of it
            u_rows = cls.out_inverse(params.tensors, params.meta, picked)
            g = (u_rows * u_rows) @ weights
        else:
            g = weights[rows]
        sample = wt[rows]
        context = self.quantizer.row_context(wt, ht)
        scale = out_f / rows.numel()
        swept = self.quantizer.sweep(sample, ht, settings, context)
        if hints is not None:
            hints.update({s.label(): hint for s, (_, hint) in zip(settings, swept) if hint is not None})
        return [scale * weighted_distortion(d - sample, ht, g) for d, _ in swept]
