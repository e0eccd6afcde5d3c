"""Step: the rank of W_q and W_k per decoder layer (0 keeps the projection dense)."""
from __future__ import annotations

from torch import nn

from casp.algorithms.lowrank import auto_ranks, check_rank, rank_for_ratio
from casp.errors import CaspError
from casp.models.adapters import Adapter

QK = ("q", "k")
AUTO_BASE_RATIO = 0.25


def check_separate_qk(layers: nn.ModuleList, adapter: Adapter, qk_rank="joint", overrides=None) -> None:
    """Low-rank Q/K needs W_q and W_k as separate linears; the adapter says whether the family has them.

    `qk_rank` / `overrides` are what the run asks for. A fused family passes when no low rank is
    forced: every ratio 0, or "joint" (which then offers only the dense fused projection).
    """
    ratios = [qk_rank, *(overrides or {}).values()]
    wants_lowrank = any(r != "joint" and (isinstance(r, str) or float(r) != 0) for r in ratios)
    if not adapter.separate_qk:
        if wants_lowrank:
            raise CaspError(f"{adapter.family}: W_q and W_k are fused into one {adapter.q_proj} projection, so "
                            "low-rank Q/K is not possible; use --qk-rank 0 or joint (the fused projection is "
                            "then compressed like any other linear)")
        return
    for p in QK:
        try:
            module = layers[0].get_submodule(adapter.qk_name(p))
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise CaspError(f"this model has no separate {adapter.qk_name(p)} projection; low-rank Q/K needs "
                            "separate W_q and W_k (use --qk-rank 0)")


def choose_ranks(layers: nn.ModuleList, adapter: Adapter, qk_rank, overrides: dict[int, float],
                 analysis=None) -> list[dict[str, int]]:
    """Per layer {"q": r, "k": r}. `qk_rank` is a ratio, or "auto" (needs `analysis`: spectra and density)."""
    check_separate_qk(layers, adapter, qk_rank, overrides)
    shapes = [{p: tuple(layer.get_submodule(adapter.qk_name(p)).weight.shape) for p in QK} for layer in layers]
    if qk_rank == "auto":
        budget = sum(rank_for_ratio(*s[p], AUTO_BASE_RATIO) * sum(s[p]) for s in shapes for p in QK)
        spectra = [a.spectra[p] for a in analysis for p in QK]
        weights = [a.attention.mean_density for a in analysis for p in QK]
        flat = auto_ranks(spectra, [s[p] for s in shapes for p in QK], weights, budget, min_rank=1)
        return [{p: flat[2 * i + j] for j, p in enumerate(QK)} for i in range(len(layers))]
    ranks = []
    for i, s in enumerate(shapes):
        value = overrides.get(i, float(qk_rank))
        r = {p: rank_for_ratio(*s[p], value) if value <= 1 else int(value) for p in QK}
        for p in QK:
            try:
                check_rank(*s[p], r[p])
            except ValueError as e:
                raise CaspError(f"layer {i} W_{p}: {e}") from None
        ranks.append(r)
    return ranks
