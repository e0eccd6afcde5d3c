"""Measured plans kept on disk, so that a second target on the same model costs only the allocation and
the layer pass.

A plan (Q/K ranks, each unit's measured damage at each candidate, the output Fisher, the joint Q/K option
tables) depends on the model's weights, the calibration data, every recipe field but the target and the
rule that spends it (`Recipe.measurement_key`), and the code that measured it. The key hashes all four:
the model directory's file names, sizes and modification times, the calibration file's, the key, and
the source of the installed casp package. Each plan is two files under `$CASP_PLAN_CACHE` (default
`$CASP_CACHE/plans`): the Fisher weights as safetensors and everything else as JSON, written atomically,
the JSON last; nothing is unpickled. Settings are rebuilt only as a registered quantizer's setting type.
Plans that carry every quantized candidate (`--search-steps`) are not kept: they are as large as the model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from casp.models.real_models import cache_dir
from casp.steps.joint import QKOption
from casp.steps.measured import Measured
from casp.steps.units import UnitKey, units_from_state, units_state


def _files_stamp(path: Path) -> str:
    """Names, sizes and modification times of a file or of a directory's files (not recursive)."""
    if path is None or not path.exists():
        return ""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


@functools.cache
def code_stamp() -> str:
    """A hash of casp's own source: a plan measured by other code is not reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def plan_key(run) -> str:
    """The measured plan's identity: the recipe's measurement key, the model's and calibration file's stamps and
    the code's."""
    recipe = run.recipe
    calib = recipe.calib_text or recipe.calib_jsonl
    return "|".join([recipe.measurement_key(), _files_stamp(Path(run.source)) if run.source else "",
                     _files_stamp(Path(calib)) if calib else "", code_stamp()])


def _setting_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_setting_type(name: str) -> type:
    """The setting type of a registered quantizer, by its qualified name (never imported from the file)."""
    from casp.quant.base import available_quantizers, get_quantizer_class

    for q in available_quantizers():
        candidates = get_quantizer_class(q)().candidates()
        if candidates and _setting_name(type(candidates[0])) == name:
            return type(candidates[0])
    raise KeyError(name)


def _state(measured: Measured) -> dict:
    """Everything but the Fisher weights as JSON data."""
    tables, kind = None, None
    if measured.qk_tables is not None:
        tables = {}
        for key, table in measured.qk_tables.items():
            tables[str(key)] = {label: [o.rank, dataclasses.asdict(o.setting), cost, damage]
                                for label, (o, cost, damage) in table.items()}
            kind = kind or next((_setting_name(type(o.setting)) for o, _, _ in table.values()), None)
    return {"ranks": measured.ranks, "units": units_state(measured.units), "has_fisher": measured.fisher is not None,
            "qk_tables": tables, "setting_type": kind,
            "layer_scales": None if measured.layer_scales is None else {str(i): points for i, points
                                                                        in measured.layer_scales.items()},
            "scale_trust": measured.scale_trust, "type_scales": measured.type_scales, "type_trust": measured.type_trust}


def _measured(state: dict, fisher: dict | None) -> Measured:
    """The `Measured` of `_state` data and its Fisher weights."""
    tables = state["qk_tables"]
    if tables is not None:
        setting = _registered_setting_type(state["setting_type"]) if state["setting_type"] else None
        tables = {UnitKey.parse(key): {label: (QKOption(rank, setting(**values)), cost, damage)
                                       for label, (rank, values, cost, damage) in table.items()}
                  for key, table in tables.items()}
    scales = state.get("layer_scales")
    scales = None if scales is None else {int(i): [tuple(p) for p in points] for i, points in scales.items()}
    return Measured(state["ranks"], units_from_state(state["units"]), fisher, tables, layer_scales=scales,
                    scale_trust=state.get("scale_trust"), type_scales=state.get("type_scales"),
                    type_trust=state.get("type_trust"))


class PlanCache:
    """A dict-like plan cache on disk (`RunOptions.cache`); keys are `plan_key`s."""

    def __init__(self, root: Path | None = None):
        env = os.environ.get("CASP_PLAN_CACHE")
        self.root = Path(root) if root is not None else Path(env) if env else cache_dir() / "plans"

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}{suffix}"

    def __contains__(self, key: str) -> bool:
        return self._path(key, ".json").exists()

    def __getitem__(self, key: str) -> Measured:
        try:
            state = json.loads(self._path(key, ".json").read_text())
            fisher = load_file(self._path(key, ".safetensors")) if state["has_fisher"] else None
        except FileNotFoundError:
            raise KeyError(key) from None
        return _measured(state, fisher)

    def __setitem__(self, key: str, measured: Measured) -> None:
        if measured.database:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        if measured.fisher is not None:
            tensors = self._path(key, ".safetensors")
            save_file({k: v.contiguous() for k, v in measured.fisher.items()}, str(tensors) + suffix)
            os.replace(str(tensors) + suffix, tensors)
        state = self._path(key, ".json")
        Path(str(state) + suffix).write_text(json.dumps(_state(measured)))
        os.replace(str(state) + suffix, state)
