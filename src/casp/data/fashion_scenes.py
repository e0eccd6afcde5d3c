"""Pictures of real Fashion-MNIST photos on a 2 × 2 grid, and questions whose answers need a few visual tokens.

Each picture holds up to four items drawn from three classes (so counts above one are common) and
empty cells. Three question types, one question per picture:
- position: "What is in the top left?" → a class name, or "nothing";
- presence: "Is there a bag?" → yes / no (half the time about a class that is there);
- count: "How many coat items are there?" → 0-4.
An item is 96 × 96 pixels, 3 × 3 of the vision encoder's 6 × 6 feature map, so an answer rests on a
few of the 36 visual tokens. Records are the dicts casp's VQA evaluation reads:
{"image", "question", "answer", "type"}; each split draws only its own photos, under its own seed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from casp.data import fashion_mnist

GRID = 2
CELL = 96
SIZE = GRID * CELL
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TYPES = ("position", "presence", "count")
EMPTY_CELL = 0.25
CLASSES_PER_PICTURE = 3
_SPLIT_SEED = {"train": 11, "validation": 12, "test": 13}


def picture(photos: np.ndarray, cells: list[int | None]) -> Image.Image:
    """The RGB picture of `cells` (row-major photo indices into `photos`, None for empty)."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    for c, index in enumerate(cells):
        if index is None:
            continue
        item = Image.fromarray(photos[index]).resize((CELL, CELL), Image.BILINEAR)
        row, col = divmod(c, GRID)
        canvas.paste(item, (col * CELL, row * CELL))
    return canvas.convert("RGB")


def _layout(rng: np.random.Generator, by_class: list[np.ndarray]) -> tuple[list[int | None], list[int | None]]:
    """Photo indices and classes of the cells (None: empty), at least one cell filled."""
    cells, labels = _cells(rng, by_class)
    while all(c is None for c in cells):
        cells, labels = _cells(rng, by_class)
    return cells, labels


def _cells(rng: np.random.Generator, by_class: list[np.ndarray]) -> tuple[list[int | None], list[int | None]]:
    classes = rng.choice(len(by_class), CLASSES_PER_PICTURE, replace=False)
    cells, labels = [], []
    for _ in range(GRID * GRID):
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
    k = int(rng.choice(present)) if present and rng.random() < 0.5 else int(rng.integers(len(names)))
    if kind == "presence":
        return f"Is there a {names[k]}?", "yes" if k in labels else "no"
    return f"How many {names[k]} items are there?", str(labels.count(k))


def records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` picture-question records of `split`, the same for the same (split, n, seed)."""
    photos, classes = fashion_mnist.images(split)
    by_class = [np.flatnonzero(classes == k) for k in range(len(fashion_mnist.CLASSES))]
    rng = np.random.default_rng([_SPLIT_SEED[split], seed])
    out = []
    for i in range(n):
        cells, labels = _layout(rng, by_class)
        kind = TYPES[i % len(TYPES)]
        question, answer = _question(rng, kind, labels)
        out.append({"image": picture(photos, cells), "question": question, "answer": answer, "type": kind,
                    "cells": cells})
    return out
