"""Which of a checkpoint's linear weights already lie on a quantization grid, read from its safetensors files.

Each 2-D weight of a decoder layer is checked on its first `SAMPLE_ROWS` rows (a slice read through the
memory map, so a large checkpoint costs little) with `algorithms.source_grid.detect_grid`.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from casp.algorithms.source_grid import detect_grid

SAMPLE_ROWS = 64
_LAYER_WEIGHT = re.compile(r"\.layers?\.\d+\..*\.weight$|\.h\.\d+\..*\.weight$")


def detect_source_grids(path: str | Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (bits, group size) for every decoder-layer weight of `path` found on a grid."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[int, int]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if not _LAYER_WEIGHT.search(key) or "norm" in key:
                        continue
                    sliced = handle.get_slice(key)
                    if len(sliced.get_shape()) != 2:
                        continue
                    grid = detect_grid(sliced[:SAMPLE_ROWS].float())
                    if grid is not None:
                        found[key] = grid
        except (SafetensorError, OSError):
            continue  # the loader reports unreadable files in one line; detection only reads what it can
    return found


def grid_counts(grids: dict[str, tuple[int, int]]) -> Counter:
    """How many matrices lie on each grid, keyed "4b-g32"."""
    return Counter(f"{b}b-g{g}" for b, g in grids.values())
