"""What a model directory says about itself: its config.json, architecture, and whether casp wrote it."""
from __future__ import annotations

import json
from pathlib import Path

from casp.errors import CaspError

QUANT_METHOD = "casp"


def read_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CaspError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaspError(f"cannot read {cfg_file}: {e}") from None
    if not isinstance(raw, dict):
        raise CaspError(f"{cfg_file} is not a JSON object")
    return raw


def architecture_of(path: Path) -> str:
    archs = read_config(path).get("architectures") or []
    if not archs:
        raise CaspError(f"{path}/config.json names no architecture")
    return archs[0]


def is_compressed(path: Path) -> bool:
    q = read_config(path).get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD
