"""The writer of a run held in memory: it keeps each layer's report row and saves the whole model at the end.

It has the interface of `casp.io.stream_writer.StreamWriter`, so the pipeline treats both alike.
"""
from __future__ import annotations

from pathlib import Path


class MemoryWriter:
    """Nothing is written while layers finish; `finish` saves the model to `out` (when given)."""

    spill_dir = None

    def __init__(self, out: str | Path | None, *, overwrite: bool):
        self.out = Path(out) if out is not None else None
        self.overwrite = overwrite
        self.rows: dict[int, dict] = {}

    def saved_plan(self) -> None:
        return None

    def save_plan(self, state: dict) -> None:
        pass

    def resume_point(self, num_layers: int):
        return 0, None

    def layer_done(self, index: int, layer, prefix: str, row: dict, next_inputs) -> None:
        if row is not None:
            self.rows[index] = row

    def layer_rows(self) -> list[dict]:
        return [self.rows[i] for i in sorted(self.rows)]

    def abandon(self) -> None:
        pass

    def finish(self, result, layer_source) -> Path | None:
        """Save `result` (a `CompressionResult`) to OUT atomically; None for a run kept in memory only."""
        if self.out is None:
            return None
        from casp.io.storage import save_compressed

        return save_compressed(result, self.out, overwrite=self.overwrite)
