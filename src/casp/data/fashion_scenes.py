"""Panels of four real Fashion-MNIST photos, and questions whose answers need a few of their visual tokens.

A panel is a 2 × 2 grid: four 96 × 96 images, top left to bottom right, each a photo or an empty (black)
cell. Its items are drawn from three classes, so a class often fills two cells; at least one class fills
exactly one. Three question types, one question per panel:
- position: "What is in the top left?" → a class name, or "nothing";
- presence: "Is there a bag?" → yes / no (half the time about a class that is there, half not);
- where: "Where is the bag?" → the cell of an item whose class fills exactly one cell ("top left", ...).
Counting ("How many coat items are there?") was a type of an earlier version; the frozen language model
stayed at chance on it (docs/fashion_vlm.md). Each image is 3 × 3 of the vision encoder's feature map, so
an answer rests on a few of the panel's 36 visual tokens. Records are the dicts casp's VQA evaluation reads — {"image": [four images], "question",
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
TYPES = ("position", "presence", "where")
EMPTY_CELL = 0.25
CLASSES_PER_PANEL = 3
_SPLIT_SEED = {"train": 11, "validation": 12, "test": 13}


def cell_image(photos: np.ndarray, index: int | None) -> Image.Image:
    """One cell: the photo upscaled to 96 × 96 (bilinear), or black when empty; RGB."""
    if index is None:
        return Image.new("RGB", (CELL, CELL), 0)
    return Image.fromarray(photos[index]).resize((CELL, CELL), Image.BILINEAR).convert("RGB")


def _layout(rng: np.random.Generator, by_class: list[np.ndarray]) -> tuple[list[int | None], list[int | None]]:
    """Photo indices and classes of the cells (None: empty), with a class that fills exactly one cell."""
    cells, labels = _cells(rng, by_class)
    while not _single(labels):
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


def _single(labels: list[int | None]) -> list[int]:
    """The classes that fill exactly one cell, in class order."""
    return sorted(k for k in set(labels) if k is not None and labels.count(k) == 1)


def _question(rng: np.random.Generator, kind: str, labels: list[int | None]) -> tuple[str, str]:
    names = fashion_mnist.CLASSES
    if kind == "position":
        p = int(rng.integers(len(POSITIONS)))
        return f"What is in the {POSITIONS[p]}?", names[labels[p]] if labels[p] is not None else "nothing"
    if kind == "presence":
        present = sorted({k for k in labels if k is not None})
        absent = [k for k in range(len(names)) if k not in present]
        k = int(rng.choice(present if rng.random() < 0.5 else absent))
        return f"Is there a {names[k]}?", "yes" if k in labels else "no"
    k = int(rng.choice(_single(labels)))
    return f"Where is the {names[k]}?", POSITIONS[labels.index(k)]


def _photos_by_class(split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The split's photos, and the indices of its photos of each class."""
    photos, classes = fashion_mnist.images(split)
    return photos, [np.flatnonzero(classes == k) for k in range(len(fashion_mnist.CLASSES))]


def panels(split: str, n: int, seed: int = 0, per_type: int = 2) -> list[dict]:
    """`n` training panels, each with `per_type` questions of every type: {"image", "labels", "questions"}.

    Several questions share one panel's picture, so a trainer can run the picture once per panel; the
    draws are the same for the same (split, n, seed, per_type), under a seed stream of their own.
    """
    photos, by_class = _photos_by_class(split)
    rng = np.random.default_rng([_SPLIT_SEED[split], seed, per_type])
    out = []
    for _ in range(n):
        cells, labels = _layout(rng, by_class)
        questions = [(kind, *_question(rng, kind, labels)) for kind in TYPES for _ in range(per_type)]
        out.append({"image": [cell_image(photos, c) for c in cells], "cells": cells, "labels": labels,
                    "questions": [{"type": t, "question": q, "answer": a} for t, q, a in questions]})
    return out


def records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` panel-question records of `split`, the same for the same (split, n, seed)."""
    photos, by_class = _photos_by_class(split)
    rng = np.random.default_rng([_SPLIT_SEED[split], seed])
    out = []
    for i in range(n):
        cells, labels = _layout(rng, by_class)
        kind = TYPES[i % len(TYPES)]
        question, answer = _question(rng, kind, labels)
        out.append({"image": [cell_image(photos, c) for c in cells], "question": question, "answer": answer,
                    "type": kind, "cells": cells, "labels": labels})
    return out
