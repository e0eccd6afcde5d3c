"""Measured plans kept on disk, so that a second target on the same model costs only the allocation and
the layer pass.

A plan (Q/K ranks, each unit's measured damage at each candidate, the output Fisher, the joint Q/K option
tables) depends on the model's weights, the calibration data, every recipe field but the target and the
rule that spends it (`Recipe.measurement_key`), and the code that measured it. The key hashes all four:
the model directory's file names, sizes and modification times, the calibration file's, the key, and
the source of the installed casp package. One file per key under `$CASP_PLAN_CACHE` (default `$CASP_CACHE/plans`), written atomically.
Plans that carry every quantized candidate (`--search-steps`) are not kept: they are as large as the model.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from casp.models.real_models import cache_dir


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


class PlanCache:
    """A dict-like plan cache on disk (`RunOptions.cache`); keys are `plan_key`s."""

    def __init__(self, root: Path | None = None):
        env = os.environ.get("CASP_PLAN_CACHE")
        self.root = Path(root) if root is not None else Path(env) if env else cache_dir() / "plans"

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def __getitem__(self, key: str):
        try:
            return torch.load(self._path(key), weights_only=False)
        except FileNotFoundError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, measured) -> None:
        if getattr(measured, "database", None):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(measured, tmp)
        os.replace(tmp, path)
