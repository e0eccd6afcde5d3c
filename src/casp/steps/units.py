"""The stored matrices of a run: one `Unit` per dense linear, or two per low-rank W_q / W_k."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import NamedTuple

from torch import nn

from casp.errors import CaspError
from casp.models.adapters import Adapter


class UnitKey(NamedTuple):
    """Which stored matrix: decoder layer and dotted name inside it (a factor's name ends in .down / .up).

    Its text form "layer:name" is what JSON files (the resume plan) and per-unit seeds use."""

    layer: int
    name: str

    def __str__(self) -> str:
        return f"{self.layer}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> "UnitKey":
        layer, name = text.split(":", 1)
        return cls(int(layer), name)

    def factor(self, role: "Role") -> "UnitKey":
        """The key of this projection's down or up factor."""
        return UnitKey(self.layer, f"{self.name}.{role.value}")


class Role(Enum):
    """What a unit stores: a whole projection, or the down (n→r) or up (r→m) factor of one."""

    DENSE = "dense"
    DOWN = "down"
    UP = "up"


@dataclass
class Unit:
    """One stored matrix of decoder layer `layer`."""

    layer: int
    module: str          # dotted path of the original projection inside the layer
    role: Role
    input_group: str     # the adapter input group whose XᵀX feeds the original projection
    out_features: int
    in_features: int
    num_weights: int     # weights of the original projection attributed to this unit
    qk: str | None = None                      # "q" or "k" for W_q / W_k, else None
    rank: int = 0                              # rank of the low-rank projection it belongs to
    distortion: dict[str, float] = field(default_factory=dict)   # candidate label -> measured damage
    hints: dict[str, dict] = field(default_factory=dict)         # label -> what the plan's sweep chose (E8: scale)

    @property
    def name(self) -> str:
        return self.module if self.role is Role.DENSE else f"{self.module}.{self.role.value}"

    @property
    def key(self) -> UnitKey:
        return UnitKey(self.layer, self.name)

    @property
    def is_factor(self) -> bool:
        return self.role is not Role.DENSE


def plan_units(layers: nn.ModuleList, adapter: Adapter, ranks: list[dict[str, int]],
               only: tuple[int, ...] | None = None) -> list[Unit]:
    """The stored matrices of the selected decoder layers (all by default), given the Q/K ranks."""
    group_of = {name: g for g, names in adapter.linears.items() for name in names}
    qk_of = {adapter.qk_name(p): p for p in ("q", "k")} if adapter.separate_qk else {}
    units = []
    for i, layer in enumerate(layers):
        if only is not None and i not in only:
            continue
        for name in adapter.linear_names():
            m, n = layer.get_submodule(name).weight.shape
            qk = qk_of.get(name)
            r = ranks[i].get(qk, 0) if qk else 0
            g = group_of[name]
            if r:
                down_share = (m * n * n) // (m + n)
                units.append(Unit(i, name, Role.DOWN, g, r, n, down_share, qk, r))
                units.append(Unit(i, name, Role.UP, g, m, r, m * n - down_share, qk, r))
            else:
                units.append(Unit(i, name, Role.DENSE, g, m, n, m * n, qk))
    return units


@dataclass
class Plan:
    """What the layer pass carries out: Q/K ranks per layer, the units, each unit's setting, and the summary of
    how they were chosen (for the report)."""

    ranks: list[dict[str, int]]
    units: list[Unit]
    settings: dict[UnitKey, object]
    summary: dict = field(default_factory=dict)

    def units_of(self, layer: int) -> list[Unit]:
        return [u for u in self.units if u.layer == layer]


def with_hints(units: list[Unit], measured: list[Unit]) -> list[Unit]:
    """`units` (rebuilt after a joint allocation) given the sweep's hints of the measured units of the same key."""
    hints = {u.key: u.hints for u in measured}
    for u in units:
        u.hints = dict(hints.get(u.key, {}))
    return units


def units_state(units: list[Unit]) -> list[dict]:
    """Units as plain JSON data (`units_from_state` reads them back)."""
    return [{**{f.name: getattr(u, f.name) for f in fields(Unit)}, "role": u.role.value} for u in units]


def units_from_state(state: list[dict]) -> list[Unit]:
    return [Unit(**{**u, "role": Role(u["role"])}) for u in state]


def plan_state(plan: Plan) -> dict:
    """A run's ranks, units, settings and allocation summary as plain JSON data (what `--resume` reads back)."""
    return {
        "ranks": plan.ranks,
        "units": units_state(plan.units),
        "plan": {str(key): asdict(setting) for key, setting in plan.settings.items()},
        "labels": {str(key): setting.label() for key, setting in plan.settings.items()},
        "summary": plan.summary,
    }


def restore_plan_state(state: dict, setting_type) -> Plan:
    """The `Plan` of `plan_state` data; settings rebuilt as `setting_type` and checked by label."""
    units = units_from_state(state["units"])
    settings = {UnitKey.parse(key): setting_type(**values) for key, values in state["plan"].items()}
    if any(settings[UnitKey.parse(key)].label() != label for key, label in state["labels"].items()):
        raise CaspError("--resume: the saved plan does not match this quantizer's settings; delete the partial run")
    return Plan(state["ranks"], units, settings, state["summary"])
