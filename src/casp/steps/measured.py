"""What the measuring pass over the original model produces: the plan's input, cached between runs."""
from __future__ import annotations

from dataclasses import dataclass

from casp.steps.units import Unit


@dataclass
class Measured:
    """What the original model showed: Q/K ranks (None until chosen), the units with their measured damages,
    the output Fisher, the joint W_q / W_k option tables, for the search every quantized candidate, and for
    measured damage the scales of each layer and projection type (`casp.steps.layer_scales`) and, while they
    are measured, the probe weights."""

    ranks: list[dict[str, int]] | None
    units: list[Unit]
    fisher: dict | None = None
    qk_tables: dict | None = None
    database: dict | None = None
    layer_scales: dict[int, list[tuple[float, float]]] | None = None
    probes: dict | None = None
    scale_trust: dict[str, float] | None = None      # probe label -> the share of the scales' spread kept
    type_scales: dict[str, float] | None = None      # projection (dotted name in its layer) -> its factor
    type_trust: dict[str, float] | None = None       # probe label -> the share of the type factors' spread kept
    seconds: dict[str, float] | None = None          # the measuring's parts, when measured by this run (not cached)
