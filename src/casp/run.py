"""The run: one object that carries a compression run's recipe, codec, model, device, progress and output.

Steps take `(run, data)`. The writer is a `MemoryWriter` (keeps rows, saves at the end) or a
`StreamWriter` (writes each layer as it finishes, resumable); both have one interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from torch import nn

from casp.codec import Codec
from casp.recipe import Recipe


@dataclass
class RunOptions:
    """How a run is carried out, never what it produces: replacing OUT, a plan cache shared between runs
    (runs with the same `Recipe.measurement_key` measure once), continuing a killed streamed run."""

    overwrite: bool = False
    cache: dict | None = None
    resume: bool = False


@dataclass
class Run:
    """A compression run in progress."""

    recipe: Recipe
    codec: Codec | None
    model: nn.Module
    processor: object
    adapter: object
    source: Path                     # the model's directory
    layer_source: object             # `InMemoryLayers` or a streamed checkpoint's layers
    writer: object                   # `MemoryWriter` or `StreamWriter`
    progress: bool = True
    cache: dict | None = None
    times: dict = field(default_factory=dict)
    check: object = None             # `BaselineCheck` while the allocation is checked against uniform
    reference: tuple | None = None   # (held-out samples, the original model's log-probabilities on them)

    @property
    def device(self) -> str:
        return self.recipe.device

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    @cached_property
    def geometry(self):
        return self.adapter.attention_geometry(self.model)

    def prefix(self, index: int) -> str:
        """The state-dict prefix of decoder layer `index`."""
        return f"{self.adapter.layers}.{index}."


def open_writer(recipe: Recipe, out, options: RunOptions):
    """The run's writer: streamed runs write into OUT.partial as layers finish, others save at the end."""
    from casp.errors import CaspError
    from casp.io.memory_writer import MemoryWriter

    if not recipe.stream:
        return MemoryWriter(out, overwrite=options.overwrite)
    if out is None:
        raise CaspError("--stream writes each layer as it finishes: it needs an output directory")
    from casp.io.stream_writer import StreamWriter

    return StreamWriter(out, recipe.to_dict(), resume=options.resume, overwrite=options.overwrite)
