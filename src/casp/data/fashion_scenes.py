"""Panels of four real Fashion-MNIST photos, and questions whose answers need a few of their visual tokens.

A panel is a 2 × 2 grid: four 96 × 96 images, top left to bottom right, each a photo or an empty (black)
cell. Its items are drawn from three classes, so counts above one are common. Three question types,
one question per panel:
- position: "What is in the top left?" → a class name, or "nothing";
- presence: "Is there a bag?" → yes / no (half the time about a class that is there);
- count: "How many coat items are there?" → 0-4.
Each image is 3 × 3 of the vision encoder's feature map, so an answer rests on a few of the panel's 36
visual tokens. Records are the dicts casp's VQA evaluation reads — {"image": [four images], "question",
"answer", "type"} — plus the cells' photo indices and classes; each split draws only its own photos,
under its own seed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from casp.data import fashion_mnist

CELLS = 4
CELL = 96
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TYPES = ("position", "presence", "count")
EMPTY_CELL = 0.25
CLASSES_PER_PANEL = 3
_SPLIT_SEED = {"train": 11, "validation": 12, "test": 13}


def cell_image(photos: np.ndarray, index: int | None) -> Image.Image:
    """One cell: the photo upscaled to 96 × 96 (bilinear), or black when empty; RGB."""
    if index is None:
        return Image.new("RGB", (CELL, CELL), 0)
    return Image.fromarray(photos[index]).resize((CELL, CELL), Image.BILINEAR).convert("RGB")


def _layout(rng: np.random.Generator, by_class: list[np.ndarray]) -> tuple[list[int | None], list[int | None]]:
    """Photo indices and classes of the cells (None: empty), at least one cell filled."""
    cells, labels = _cells(rng, by_class)
    while all(c is None for c in cells):
        cells, labels = _cells(rng, by_class)
    return cells, labels


def _cells(rng: np.random.Generator, by_class: list[np.ndarray]) -> tuple[list[int | None], list[int | None]]:
    classes = rng.choice(len(by_class), CLASSES_PER_PANEL, replace=False)
    cells, labels = [], []
    for _ in range(CELLS):
        if rng.random() < EMPTY_CELL:
            cells.append(None)
            labels.append(None)
            continue
        k = int(rng.choice(classes))
        cells.append(int(rng.choice(by_class[k])))
        labels.append(k)
    return cells, labels


def _question(rng: np.random.Generator, kind: str, labels: list[int | None]) -> tuple[str, str]:
    names = fashion_mnist.CLASSES
    if kind == "position":
        p = int(rng.integers(len(POSITIONS)))
        return f"What is in the {POSITIONS[p]}?", names[labels[p]] if labels[p] is not None else "nothing"
    present = [k for k in labels if k is not None]
    k = int(rng.choice(present)) if rng.random() < 0.5 else int(rng.integers(len(names)))
    if kind == "presence":
        return f"Is there a {names[k]}?", "yes" if k in labels else "no"
    return f"How many {names[k]} items are there?", str(labels.count(k))


def records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` panel-question records of `split`, the same for the same (split, n, seed)."""
    photos, classes = fashion_mnist.images(split)
    by_class = [np.flatnonzero(classes == k) for k in range(len(fashion_mnist.CLASSES))]
    rng = np.random.default_rng([_SPLIT_SEED[split], seed])
    out = []
    for i in range(n):
        cells, labels = _layout(rng, by_class)
        kind = TYPES[i % len(TYPES)]
        question, answer = _question(rng, kind, labels)
        out.append({"image": [cell_image(photos, c) for c in cells], "question": question, "answer": answer,
                    "type": kind, "cells": cells, "labels": labels})
    return out
