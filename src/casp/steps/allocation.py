"""Step: one setting per unit under the bit budget, priced exactly by the quantizer's stored format."""
from __future__ import annotations

from casp.algorithms import allocate as alloc
from casp.errors import CaspError
from casp.steps.units import Unit


def unit_cost(unit: Unit, setting, quantizer, transform=None) -> int:
    """Exact stored bits of a unit at a setting: the quantizer's format plus the transform's parameters."""
    bits = quantizer.stored_bits(setting, unit.out_features, unit.in_features)
    if transform is not None:
        bits += transform.stored_bits(unit.out_features, unit.in_features)
    return bits


def allocate(units: list[Unit], quantizer, *, bits: float, rule: str, granularity: str, num_layers: int,
             transform=None) -> dict[str, object]:
    """unit.key -> setting. `rule` is uniform, paper or rd; rd works per matrix or per layer."""
    if rule == "uniform":
        setting = quantizer.uniform_setting(bits)
        return {u.key: setting for u in units}
    settings = quantizer.candidates()
    by_label = {s.label(): s for s in settings}
    a_units = [
        alloc.Unit(name=u.key, num_weights=u.num_weights,
                   cost_bits={s.label(): unit_cost(u, s, quantizer, transform) for s in settings},
                   distortion=u.distortion, layer_index=u.layer,
                   kind=f"{u.qk}_factor" if u.is_factor else "dense")
        for u in units
    ]
    members = {u.name: [u.name] for u in a_units}
    if granularity == "layer" and rule == "rd":
        a_units, members = merge_per_layer(a_units)
    try:
        if rule == "paper":
            result = alloc.allocate_paper(a_units, bits, num_layers)
        else:
            result = alloc.allocate_rd(a_units, bits, solver="best")
    except alloc.InfeasibleBudget as e:
        raise CaspError(str(e)) from None
    return {m: by_label[key] for name, key in result.choice.items() for m in members[name]}


def merge_per_layer(units: list[alloc.Unit]):
    """One unit per decoder layer for its dense matrices (factors keep their own unit): same setting for all."""
    merged, members = {}, {}
    for u in units:
        factor = u.kind.endswith("_factor")
        name = u.name if factor else f"layer{u.layer_index}"
        if name not in merged:
            merged[name] = alloc.Unit(name=name, num_weights=0, cost_bits=dict.fromkeys(u.cost_bits, 0),
                                      distortion=dict.fromkeys(u.distortion, 0.0), layer_index=u.layer_index,
                                      kind=u.kind if factor else "layer")
            members[name] = []
        m = merged[name]
        m.num_weights += u.num_weights
        for k, v in u.cost_bits.items():
            m.cost_bits[k] += v
        for k, v in u.distortion.items():
            m.distortion[k] += v
        members[name].append(u.name)
    return list(merged.values()), members
