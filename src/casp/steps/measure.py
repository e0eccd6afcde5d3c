"""Step: each unit's damage at each candidate setting, measured on the original layer's inputs."""
from __future__ import annotations

from tqdm.auto import tqdm

from casp.algorithms.distortion import weighted_distortion
from casp.models.adapters import Adapter
from casp.steps.quantize import factorise, quantize_unit, transform_seed, unit_weight_and_xtx
from casp.steps.units import Role, Unit


def measure_distortions(layers, adapter: Adapter, units: list[Unit], analysis, ranks, settings, quantizer,
                        fisher: dict | None, *, transform=None, seed: int = 0, keep: dict | None = None,
                        progress: bool = True, device="cpu") -> None:
    """Fill `unit.distortion[label]`: the Fisher-weighted output distortion of quantizing it at each setting.

    With `keep`, also store each quantized weight (fp16, original basis, on the CPU) under (unit.key, label).
    The layer is on `device`; its XᵀX is moved there.
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
            for s in settings:
                _, wq, _ = quantize_unit(w, xtx, s, quantizer, transform, transform_seed(seed, u))
                u.distortion[s.label()] = weighted_distortion(wq - w.float(), xtx, f, lift)
                if keep is not None:
                    keep[(u.key, s.label())] = wq.half().cpu()
