"""Step: one setting per unit under the bit budget, priced exactly by the quantizer's stored format."""
from __future__ import annotations

import math

from casp.algorithms import allocate as alloc
from casp.errors import CaspError
from casp.steps.costs import unit_cost
from casp.steps.joint import option_cost, qk_options
from casp.steps.units import Unit


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


def allocate_joint(units: list[Unit], qk_tables: dict, quantizer, *, bits: float, granularity: str, num_layers: int,
                   transform=None):
    """Q/K ranks and every unit's setting under one budget: (ranks per layer, unit.key -> setting, report).

    `units` are the dense units with measured distortions; `qk_tables` (from `steps.joint`) holds the
    W_q / W_k options. The allocation-alone solution (dense Q/K) is a point of the joint space; if the
    solver's joint answer has a higher total distortion than it, allocation alone is kept, so the joint
    result is never worse than allocation alone on the objective it optimises.
    """
    settings = quantizer.candidates()
    by_label = {s.label(): s for s in settings}
    plain = [u for u in units if u.key not in qk_tables]
    a_units = [alloc.Unit(name=u.key, num_weights=u.num_weights,
                          cost_bits={s.label(): unit_cost(u, s, quantizer, transform) for s in settings},
                          distortion=u.distortion, layer_index=u.layer, kind="dense") for u in plain]
    members = {u.name: [u.name] for u in a_units}
    if granularity == "layer":
        a_units, members = merge_per_layer(a_units)
    qk = [alloc.Unit(name=u.key, num_weights=u.num_weights,
                     cost_bits={label: cost for label, (_, cost, _) in qk_tables[u.key].items()},
                     distortion={label: d for label, (_, _, d) in qk_tables[u.key].items()},
                     layer_index=u.layer, kind="qk") for u in units if u.key in qk_tables]
    try:
        joint = alloc.allocate_rd(a_units + qk, bits, solver="best")
    except alloc.InfeasibleBudget as e:
        raise CaspError(str(e)) from None
    choice = dict(joint.choice)
    alone = allocate(units, quantizer, bits=bits, rule="rd", granularity=granularity, num_layers=num_layers,
                     transform=transform)
    alone_total = sum(alloc_distortion(u, alone[u.key].label(), qk_tables) for u in units)
    joint_total = float(joint.distortion)
    kept = "joint"
    if alone_total < joint_total:
        kept = "allocation alone"
        choice = {}
        for name, keys in members.items():
            choice[name] = alone[keys[0]].label()
        choice.update({u.key: f"dense:{alone[u.key].label()}" for u in units if u.key in qk_tables})
    ranks = [{"q": 0, "k": 0} for _ in range(num_layers)]
    plan = {}
    for name, label in choice.items():
        for key in members.get(name, [name]):
            if key in qk_tables:
                option = qk_tables[key][label][0]
                u = next(x for x in units if x.key == key)
                ranks[u.layer][u.qk] = option.rank
                for role in ("", ".down", ".up"):
                    plan[f"{key}{role}"] = option.setting
            else:
                plan[key] = by_label[label]
    summary = {"kept": kept, "objective_joint": joint_total, "objective_allocation_alone": alone_total}
    return ranks, plan, summary


def alloc_distortion(unit: Unit, label: str, qk_tables: dict) -> float:
    """A unit's measured distortion at a setting label (dense Q/K read from the joint table)."""
    if unit.key in qk_tables:
        return qk_tables[unit.key][f"dense:{label}"][2]
    return unit.distortion[label]


def check_feasible(layers, adapter, quantizer, config, transform=None) -> None:
    """Refuse a target below the cheapest feasible average, from the shapes alone (before calibration)."""
    from casp.steps.ranks import choose_ranks
    from casp.steps.units import plan_units

    joint = config.qk_rank == "joint"
    ranks = choose_ranks(layers, adapter, 0 if joint else config.qk_rank, config.qk_rank_overrides)
    units = plan_units(layers, adapter, ranks, config.layers)
    settings = quantizer.candidates()
    cheapest = 0
    for u in units:
        if joint and u.qk:
            opts = qk_options(u, settings, config.qk_rank_ladder, quantizer.in_features_multiple)
            cheapest += min(option_cost(u, o, quantizer, transform) for o in opts)
        else:
            cheapest += min(unit_cost(u, s, quantizer, transform) for s in settings)
    weights = sum(u.num_weights for u in units)
    if config.bits * weights < cheapest:
        floor = math.ceil(cheapest / weights * 1000) / 1000
        raise CaspError(f"target {config.bits} bits is below the minimum feasible average {floor:.3f} bits "
                        f"for this model with --quantizer {config.quantizer} (every matrix at its cheapest setting)")
