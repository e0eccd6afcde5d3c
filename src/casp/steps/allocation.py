"""Step: one setting per unit under the bit budget, priced exactly by the quantizer's stored format."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from casp.algorithms import allocate as alloc
from casp.errors import CaspError
from casp.steps.costs import unit_cost
from casp.steps.joint import option_cost, qk_options
from casp.steps.units import Role, Unit, UnitKey


@dataclass
class Allocation:
    """The allocator's problem and answer: units (possibly merged per layer), members, chosen labels."""

    units: list[alloc.Unit]
    members: dict[str, list[UnitKey]]    # allocator unit name -> the units it sets
    choice: dict[str, str]           # allocator unit name -> candidate label
    budget_bits: int
    summary: dict = field(default_factory=dict)
    alternatives: dict[str, dict[str, str]] = field(default_factory=dict)   # named answers a search may start from

    def objective(self, choice: dict[str, str] | None = None) -> float:
        choice = choice or self.choice
        return float(sum(u.distortion[choice[u.name]] for u in self.units))


def _problem(units: list[Unit], codec, granularity: str, rule: str, qk_tables=None):
    settings = codec.candidates()
    qk_tables = qk_tables or {}
    plain = [u for u in units if u.key not in qk_tables]
    a_units = [alloc.Unit(name=str(u.key), num_weights=u.num_weights,
                          cost_bits={s.label(): unit_cost(u, s, codec) for s in settings},
                          distortion=u.distortion, layer_index=u.layer,
                          kind=f"{u.qk}_factor" if u.is_factor else "dense") for u in plain]
    names = {u.name: [u.name] for u in a_units}
    if granularity == "layer" and rule == "rd":
        a_units, names = merge_per_layer(a_units)
    members = {name: [UnitKey.parse(n) for n in group] for name, group in names.items()}
    for u in units:
        if u.key in qk_tables:
            table = qk_tables[u.key]
            a_units.append(alloc.Unit(name=str(u.key), num_weights=u.num_weights,
                                      cost_bits={label: cost for label, (_, cost, _) in table.items()},
                                      distortion={label: d for label, (_, _, d) in table.items()},
                                      layer_index=u.layer, kind="qk"))
            members[str(u.key)] = [u.key]
    return a_units, members


def allocate(run, units: list[Unit], rule: str | None = None) -> dict[UnitKey, object]:
    """unit.key -> setting under the run's target. `rule` (default: the recipe's) is uniform, paper or rd; rd
    works per matrix or per layer (the recipe's granularity)."""
    rule = rule or run.recipe.allocation
    if rule == "uniform":
        setting = run.codec.uniform_setting(run.recipe.bits)
        return {u.key: setting for u in units}
    return decode(solve(run, units, rule=rule), units, run.codec, {}, len(run.layers))[1]


def solve(run, units: list[Unit], qk_tables=None, rule: str | None = None) -> Allocation:
    """The allocator's answer over units (and, with `qk_tables`, joint W_q / W_k options)."""
    recipe = run.recipe
    rule = rule or recipe.allocation
    a_units, members = _problem(units, run.codec, recipe.granularity, rule, qk_tables)
    try:
        if rule == "paper":
            result = alloc.allocate_paper(a_units, recipe.bits, len(run.layers))
        else:
            result = alloc.allocate_rd(a_units, recipe.bits, solver="best")
    except alloc.InfeasibleBudget as e:
        raise CaspError(str(e)) from None
    return Allocation(a_units, members, dict(result.choice), result.budget_bits)


def decode(a: Allocation, units: list[Unit], codec, qk_tables: dict, num_layers: int):
    """(ranks per layer, unit.key -> setting) of an allocation; factor units follow their projection."""
    by_label = {s.label(): s for s in codec.candidates()}
    ranks = [{"q": 0, "k": 0} for _ in range(num_layers)]
    layer_of = {u.key: u for u in units}
    plan = {}
    for name, label in a.choice.items():
        for key in a.members[name]:
            if key in qk_tables:
                option = qk_tables[key][label][0]
                u = layer_of[key]
                ranks[u.layer][u.qk] = option.rank
                for k in (key, key.factor(Role.DOWN), key.factor(Role.UP)):
                    plan[k] = option.setting
            else:
                plan[key] = by_label[label]
    return ranks, plan


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


def allocate_joint(run, units: list[Unit], qk_tables: dict) -> Allocation:
    """Q/K ranks and every unit's setting under one budget.

    `units` are the dense units with measured distortions; `qk_tables` (from `steps.joint`) holds the
    W_q / W_k options. The allocation-alone solution (dense Q/K) is a point of the joint space; if the
    solver's joint answer has a higher total distortion than it, allocation alone is kept, so the joint
    result is never worse than allocation alone on the objective it optimises.
    """
    joint = solve(run, units, qk_tables, rule="rd")
    joint_total = joint.objective()
    joint.summary = {"kept": "joint", "objective_joint": joint_total, "objective_allocation_alone": None}
    try:
        alone = allocate(run, units, rule="rd")
    except CaspError:
        return joint  # dense Q/K cannot meet this budget: only low-rank options can
    alone_choice = {}
    for name, keys in joint.members.items():
        label = alone[keys[0]].label()
        alone_choice[name] = f"dense:{label}" if keys[0] in qk_tables else label
    alone_total = joint.objective(alone_choice)
    joint.summary["objective_allocation_alone"] = alone_total
    if alone_total < joint_total:
        joint.alternatives["joint"] = joint.choice
        joint.choice = alone_choice
        joint.summary["kept"] = "allocation alone"
    else:
        joint.alternatives["allocation alone"] = alone_choice
    return joint


def check_feasible(run) -> None:
    """Refuse a target below the cheapest feasible average, from the shapes alone (before calibration).

    The cheapest average is taken over the allocator's own units (per layer, the layer's matrices share
    one setting), so a target that passes this check is one the allocator can meet.
    """
    from casp.steps.ranks import choose_ranks
    from casp.steps.units import plan_units

    recipe, codec, layers = run.recipe, run.codec, run.layers
    joint = recipe.qk_rank == "joint"
    ranks = choose_ranks(layers, run.adapter, 0 if joint else recipe.qk_rank, recipe.qk_rank_overrides)
    units = plan_units(layers, run.adapter, ranks, recipe.layers)
    settings = codec.candidates()
    for u in units:
        u.distortion = {s.label(): 0.0 for s in settings}
    qk_tables = None
    if joint:
        qk_tables = {u.key: {o.label: (o, option_cost(u, o, codec), 0.0)
                             for o in qk_options(u, settings, recipe.qk_rank_ladder, codec.in_features_multiple)}
                     for u in units if u.qk}
    a_units, _ = _problem(units, codec, recipe.granularity, recipe.allocation, qk_tables)
    cheapest = sum(min(u.cost_bits.values()) for u in a_units)
    weights = sum(u.num_weights for u in units)
    if recipe.bits * weights < cheapest:
        floor = math.ceil(cheapest / weights * 1000) / 1000
        raise CaspError(f"target {recipe.bits} bits is below the minimum feasible average {floor:.3f} bits "
                        f"for this model with --quantizer {recipe.quantizer} (every matrix at its cheapest setting)")


def uniform_choice(a: Allocation, codec, bits: float) -> dict[str, str]:
    """The uniform setting at int(bits) everywhere (dense Q/K), as labels of an allocation's units."""
    label = codec.uniform_setting(int(bits)).label()
    return {u.name: label if label in u.cost_bits else f"dense:{label}" for u in a.units}
