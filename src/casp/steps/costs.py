"""The exact stored bits of a unit at a setting: what the allocator budgets."""
from __future__ import annotations

from casp.steps.units import Unit


def unit_cost(unit: Unit, setting, quantizer, transform=None) -> int:
    """Exact stored bits of a unit at a setting: the quantizer's format plus the transform's parameters."""
    bits = quantizer.stored_bits(setting, unit.out_features, unit.in_features)
    if transform is not None:
        bits += transform.stored_bits(unit.out_features, unit.in_features)
    return bits
