"""What a model directory says about itself: its config.json, architecture, and whether casp wrote it."""
from __future__ import annotations

import json
from pathlib import Path

from casp.errors import CaspError

QUANT_METHOD = "casp"


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold one object (config.json, tokenizer_config.json); anything else is a CaspError."""
    try:
        raw = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaspError(f"cannot read {file}: {e}") from None
    if not isinstance(raw, dict):
        raise CaspError(f"{file} is not a JSON object")
    return raw


def read_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CaspError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    return read_json_object(cfg_file)


def architecture_of(path: Path) -> str:
    archs = read_config(path).get("architectures") or []
    if not archs:
        raise CaspError(f"{path}/config.json names no architecture")
    return archs[0]


def is_compressed(path: Path) -> bool:
    q = read_config(path).get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD
