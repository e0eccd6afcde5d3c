"""Round-to-nearest: each weight goes to the nearest point of its group's min/max (or absmax) grid.

The baseline every other quantizer must beat; it ignores the calibration statistics.
"""
from __future__ import annotations

import torch

from casp.quant.base import QuantizedWeight, Quantizer, register
from casp.quant.scalar import (SCALAR_FORMAT, QuantSpec, ScalarOptions, dequantize_scalar, reproduces, rtn_codes,
                               to_quantized_weight)


@register
class RTN(Quantizer):
    """Round-to-nearest on the scalar grid (format "scalar")."""

    name = "rtn"
    rows_independent = True
    Config = ScalarOptions
    format = SCALAR_FORMAT

    def candidates(self) -> list[QuantSpec]:
        return self.config.candidates()

    def reproduces_grid(self, setting: QuantSpec, grid: tuple[int, int]) -> bool:
        return reproduces(setting, grid)

    def uniform_setting(self, bits: float) -> QuantSpec:
        return self.config.uniform_setting(bits)

    def quantize(
        self, weight: torch.Tensor, xtx: torch.Tensor | None, spec: QuantSpec
    ) -> tuple[QuantizedWeight, torch.Tensor]:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        codes, scale, zero = rtn_codes(weight, spec)
        qw = to_quantized_weight(codes, scale, zero, spec, method=self.name)
        return qw, dequantize_scalar(qw)
