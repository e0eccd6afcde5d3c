"""Step: each unit's damage at each candidate setting, measured on the original layer's inputs."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from casp.algorithms.distortion import weighted_distortion
from casp.models.adapters import Adapter
from casp.steps.quantize import dequantize_unit_many, factorise, transform_seed, unit_weight_and_xtx
from casp.steps.units import Role, Unit

MEASURE_ROWS = 256   # output rows a large matrix's damage is estimated from (rows-independent quantizers)


def measured_rows(unit: Unit, out_features: int, quantizer, *, exact: bool, seed: int) -> torch.Tensor | None:
    """A fixed random subset of output rows to measure on, or None for all of them.

    A quantizer whose rows are quantized independently (GPTQ, RTN: one XᵀX, a grid per row group)
    has a damage that is a sum over rows, so a uniform sample scaled by out/rows estimates it without
    bias; the same rows serve every setting, so the settings of a unit compare on equal terms.
    """
    if exact or not quantizer.rows_independent or out_features <= MEASURE_ROWS:
        return None
    g = torch.Generator().manual_seed(transform_seed(seed, unit))
    return torch.randperm(out_features, generator=g)[:MEASURE_ROWS].sort().values


def on_rows(rows: torch.Tensor | None, w: torch.Tensor, fisher: torch.Tensor | None):
    """(scale to the whole matrix, w's rows, the Fisher weights of those rows) of a row sample (None: all)."""
    if rows is None:
        return 1.0, w, fisher
    return (w.shape[0] / rows.numel(), w[rows.to(w.device)],
            fisher[rows.to(fisher.device)] if fisher is not None else None)


def unit_distortions(unit: Unit, w: torch.Tensor, xtx: torch.Tensor, fisher, settings, quantizer, *, transform=None,
                     seed: int = 0, lift=None, exact: bool = False) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Fisher-weighted output distortion of `w` at each setting (label -> value), and the quantized weights.

    Unless `exact`, the damage of a large matrix is estimated from `measured_rows`, and the weights
    returned are those rows' only. Transforms mix rows and factor errors are lifted through another
    matrix, so both are always measured whole.
    """
    rows = measured_rows(unit, w.shape[0], quantizer, exact=exact or transform is not None or lift is not None,
                         seed=seed)
    scale, w, fisher = on_rows(rows, w, fisher)
    w = w.float()
    quantized = dequantize_unit_many(w, xtx, settings, quantizer, transform, transform_seed(seed, unit))
    values = {s.label(): scale * weighted_distortion(wq - w, xtx, fisher, lift) for s, wq in zip(settings, quantized)}
    return values, quantized


def measure_distortions(layers, adapter: Adapter, units: list[Unit], analysis, ranks, settings, quantizer,
                        fisher: dict | None, *, transform=None, seed: int = 0, keep: dict | None = None,
                        progress: bool = True, device="cpu") -> None:
    """Fill `unit.distortion[label]`: the Fisher-weighted output distortion of quantizing it at each setting.

    With `keep`, also store each quantized weight (fp16, original basis, on the CPU) under (unit.key, label);
    every row is then measured. The layer is on `device`; its XᵀX is moved there.
    """
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    for i in tqdm(sorted(by_layer), desc="measure", disable=not progress):
        layer = layers[i]
        moments = {k: v.to(device) for k, v in analysis[i].moments.items()}
        lowrank = factorise(layer, adapter, ranks[i], moments["attn_in"].double())
        for u in by_layer[i]:
            w, xtx = unit_weight_and_xtx(u, layer, lowrank, moments)
            f = fisher.get(f"{adapter.layers}.{i}.{u.module}") if fisher else None
            lift = lowrank[u.module].up.weight.data if u.role is Role.DOWN else None
            values, quantized = unit_distortions(u, w, xtx, f, settings, quantizer, transform=transform, seed=seed,
                                                 lift=lift, exact=keep is not None)
            u.distortion.update(values)
            if keep is not None:
                for s, wq in zip(settings, quantized):
                    keep[(u.key, s.label())] = wq.half().cpu()
