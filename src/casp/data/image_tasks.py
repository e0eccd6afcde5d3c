"""The image tasks casp's own VLMs come with: where their calibration and evaluation records come from.

The embedded tiny LLaVA has its synthetic scenes; the built-in `fashion-vlm` its Fashion-MNIST
pictures. A model (or a casp output made from one) that has a task calibrates on the task's training
records and is evaluated on its test records, with no files to give.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_TEST_SCENES = 250       # about 1,200 test questions
EMBEDDED_CAPTION_SCENES = 200
FASHION_TEST_QUESTIONS = 600     # 200 per question type


@dataclass(frozen=True)
class ImageTask:
    name: str
    calibration: Callable[[int, int], list[dict]]                           # (n, seed) → training records
    evaluation: Callable[[int | None], tuple[list[dict], list[dict] | None]]  # limit → (questions, captions)


def _embedded_calibration(n: int, seed: int) -> list[dict]:
    from casp.embedded.scenes import generate_records

    records = generate_records("train", max(1, n))
    random.Random(seed).shuffle(records)
    return records[:n]


def _embedded_evaluation(limit: int | None):
    from casp.embedded.scenes import generate_caption_records, generate_records

    vqa = generate_records("test", EMBEDDED_TEST_SCENES)
    captions = generate_caption_records("test", EMBEDDED_CAPTION_SCENES)
    if limit:
        vqa, captions = vqa[:limit], captions[: max(1, limit // 5)]
    return vqa, captions


def _fashion_calibration(n: int, seed: int) -> list[dict]:
    from casp.data.fashion_scenes import records

    return records("train", n, seed)


def _fashion_evaluation(limit: int | None):
    from casp.data.fashion_scenes import records

    return records("test", min(limit, FASHION_TEST_QUESTIONS) if limit else FASHION_TEST_QUESTIONS), None


EMBEDDED = ImageTask("embedded scenes", _embedded_calibration, _embedded_evaluation)
FASHION = ImageTask("fashion-mnist pictures", _fashion_calibration, _fashion_evaluation)


def _own_task(path: Path) -> ImageTask | None:
    from casp.embedded import EMBEDDED_MODEL_DIR
    from casp.models.fashion_vlm import MARKER, NAME

    if path.resolve() == Path(EMBEDDED_MODEL_DIR).resolve():
        return EMBEDDED
    try:
        name = json.loads((path / MARKER).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return FASHION if name == NAME else None


def task_of(path: str | Path) -> ImageTask | None:
    """The task of the model at `path`, or of the model a casp output at `path` was made from."""
    path = Path(path)
    own = _own_task(path)
    if own is not None:
        return own
    try:
        source = Path(json.loads((path / "report.json").read_text())["source"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return _own_task(source) if source.is_dir() else None
