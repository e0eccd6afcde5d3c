"""The exact stored bits of a unit at a setting: what the allocator budgets."""
from __future__ import annotations

from casp.steps.units import Unit


def unit_cost(unit: Unit, setting, codec) -> int:
    """Exact stored bits of a unit at a setting: the codec's (quantizer's format plus transform parameters)."""
    return codec.stored_bits(setting, unit.out_features, unit.in_features)
