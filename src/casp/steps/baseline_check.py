"""Step: an allocated run is never worse than the uniform setting of its quantizer, measured before saving.

The allocator trusts a per-matrix damage estimate; on a model it was not tuned on, that estimate can rank
settings badly. So an allocated run also quantizes every matrix of every layer at the quantizer's uniform
setting (in the same layer pass), and at the end measures KL(FP ‖ model) on calibration
samples held out of everything else, once with the allocated modules and once with the uniform ones. The
better model is kept; both figures go to `report["baseline_check"]`.

What the uniform layers are calibrated on (`--check-inputs`):
- "own": the uniform model's own hidden states, one more stream of hidden states through the layer pass (two
  more forward passes per layer), so a kept uniform model is exactly the one a uniform run stores.
- "shared": the allocated run's inputs and XᵀX, which the layer pass has at hand. A matrix the allocation
  stores at the uniform setting would be coded identically, so its stored module is reused (`layer_stored`)
  and only the others are coded. Cheaper, but when the allocation is bad its hidden states are too, and the
  uniform layers fitted to them are worse than a uniform run's (Gemma-3-270M: 11-16 % in perplexity,
  docs/results.md).
- "auto" (the default): shared first. Unless the allocation beats that uniform model by a clear margin
  (`SHARED_MARGIN`), the uniform model is built again on its own inputs, from the original weights kept
  aside, and the decision is made against it: the cost of "shared" when the allocation clearly wins, the
  guarantee of "own" otherwise.
The check needs the whole model in memory (no --stream), and a uniform setting that fits the target bits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from casp.models import placement
from casp.models.engine import run_layer
from casp.models.offload import offloaded
from casp.steps.analyse import observe_layer
from casp.steps.costs import unit_cost
from casp.steps.quantize import stored_unit
from casp.steps.search import fp_reference, kl_to_reference
from casp.steps.units import plan_units, with_hints


@dataclass
class BaselineCheck:
    """The held-out samples, the FP model's answers on them, and each layer's uniform alternative."""

    held: list[dict]
    reference: list[torch.Tensor]
    setting: object                                  # the quantizer's uniform setting
    uniform_bits: float                              # its average stored bits over the compressed units
    alternatives: dict[int, list] = field(default_factory=dict)   # layer -> [(unit name, module, row)]
    seconds: float = 0.0
    hidden: list[torch.Tensor] | None = None         # the uniform model's inputs to layer `next_layer` ("own")
    next_layer: int = 0
    reused: int = 0                                  # units taken from the allocation so far
    originals: dict[int, list] = field(default_factory=dict)   # "auto": layer -> [(unit name, original module)]
    first_inputs: object = None                      # "auto": the layer pass's inputs to the first compressed layer
    planned: list = field(default_factory=list)      # the plan's units, whose sweep hints the uniform coding reuses


# "auto" keeps the allocation on the shared-input check alone when its held-out KL is at most this share of the
# uniform model's; closer than that, the uniform model is rebuilt on its own inputs (on SmolLM2-135M, CASP+E8
# at 3.25 bits, the own-input uniform model's KL was 3 % below the shared one's).
SHARED_MARGIN = 0.8


def uniform_fit(run):
    """(uniform setting at ⌊target⌋ bits, its average stored bits), or None when the quantizer has no such
    setting or it needs more bits than the target."""
    codec = run.codec
    try:
        setting = codec.quantizer.uniform_setting(math.floor(run.recipe.bits + 1e-9))
    except ValueError:   # e.g. E8 below 2 bits
        return None
    units = plan_units(run.layers, run.adapter, [{}] * len(run.layers), run.recipe.layers)
    total = sum(u.num_weights for u in units)
    bits = sum(unit_cost(u, setting, codec) for u in units) / max(total, 1)
    return (setting, bits) if bits <= run.recipe.bits + 1e-9 else None


def prepare(run, held: list[dict], planned: list = ()) -> BaselineCheck | None:
    """The FP model's log-probabilities on `held`, taken before any layer is compressed; `planned` are the plan's
    units (their sweep hints serve the uniform setting too)."""
    fit = uniform_fit(run)
    if fit is None or not held:
        return None
    t0 = time.time()
    reference = fp_reference(run, held)
    return BaselineCheck(held, reference, fit[0], fit[1], seconds=time.time() - t0, planned=list(planned))


def add_layer(run, layer: nn.Module, index: int, inputs, xtx: dict, allocated: dict) -> None:
    """Quantize the layer's dense linears at the uniform setting (before the allocated modules replace them) and
    keep them aside in `run.check`. `xtx` is XᵀX of the allocated run's `inputs`; `allocated` (unit key -> setting) is what the
    allocation stores in this layer (a projection it stores as factors has no dense key there)."""
    t0 = time.time()
    check, mode = run.check, run.recipe.check_inputs
    if mode == "own":
        _on_own_inputs(run, check, layer, index, inputs, xtx)
    else:
        _on_shared_inputs(run, check, layer, index, xtx, allocated)
    if mode == "auto":
        check.originals[index] = [(u.name, layer.get_submodule(u.name)) for u in _units(run, index)]
        if check.first_inputs is None:
            check.first_inputs = replace(inputs)   # a shallow copy: the walk moves `inputs.hidden` on
    check.seconds += time.time() - t0


def _units(run, index: int):
    """Layer `index`'s dense units, with the plan's sweep hints."""
    units = plan_units(run.layers, run.adapter, [{}] * len(run.layers), (index,))
    return with_hints(units, run.check.planned) if run.check is not None else units


def _coded(run, check: BaselineCheck, u, lin, xtx: dict) -> tuple:
    """(stored module, report row) of one original linear at the check's uniform setting."""
    bias = lin.bias.data.clone() if lin.bias is not None else None
    return stored_unit(run, u, lin.weight.data, xtx[u.input_group], check.setting, bias)


def _on_shared_inputs(run, check: BaselineCheck, layer: nn.Module, index: int, xtx: dict, allocated: dict) -> None:
    """Every unit on the allocated run's XᵀX; those allocated at the uniform setting are left for `layer_stored`
    (unless tuning will change the allocated modules after they are stored)."""
    reuse = not run.recipe.finetune_steps
    kept = []
    for u in _units(run, index):
        if reuse and allocated.get(u.key) == check.setting:
            kept.append((u.name, None, None))
        else:
            kept.append((u.name, *_coded(run, check, u, layer.get_submodule(u.name), xtx)))
    check.alternatives[index] = kept


def _on_own_inputs(run, check: BaselineCheck, layer: nn.Module, index: int, inputs, xtx: dict | None) -> None:
    """Every unit on the uniform model's own inputs (observed here unless they are the run's, whose XᵀX `xtx`
    is); the uniform model's hidden states are carried on."""
    own = _own_inputs(run, check, index, inputs)
    if own is not inputs or xtx is None:
        _, moments, _ = observe_layer(layer, run.adapter, own, run.adapter.linears, run.device)
        xtx = {k: v.to(run.device) for k, v in moments.xtx.items()}
    kept = [(u.name, *_coded(run, check, u, layer.get_submodule(u.name), xtx)) for u in _units(run, index)]
    _carry_forward(run, check, layer, index, kept, own)


def _rebuild_on_own_inputs(run, check: BaselineCheck) -> None:
    """"auto"'s second look: the uniform alternative of every layer made again on its own inputs, from the
    original weights kept aside (each layer holds its originals while it is coded, and again afterwards). The
    first compressed layer's own inputs are the run's, so its shared alternative is already the one it would
    code: it is kept, and only run forward."""
    first = min(check.originals)
    shared_first = check.alternatives[first]
    check.hidden, check.next_layer, check.alternatives = None, 0, {}
    for i in sorted(check.originals):
        _put(run.layers, {i: check.originals[i]})
        with placement.on_device(run.layers[i], run.device):
            if i == first:
                _carry_forward(run, check, run.layers[i], i, shared_first, check.first_inputs)
            else:
                _on_own_inputs(run, check, run.layers[i], i, check.first_inputs, None)
    check.originals, check.first_inputs = {}, None


def _carry_forward(run, check: BaselineCheck, layer: nn.Module, index: int, kept: list, inputs) -> None:
    """Layer `index`'s uniform alternative `kept` (the layer holding its originals), run on the uniform model's
    `inputs` to it: its hidden states carried on to the next layer, the originals put back."""
    dense = [(name, layer.get_submodule(name)) for name, _, _ in kept]
    check.alternatives[index] = kept
    _put(run.layers, {index: [(n, m) for n, m, _ in kept]})
    check.hidden, check.next_layer = run_layer(layer, inputs, run.device), index + 1
    _put(run.layers, {index: dense})


def layer_stored(check: BaselineCheck, layer: nn.Module, index: int, rows: dict) -> None:
    """Once layer `index`'s units are stored: fill its uniform alternative with the modules the allocation
    stored at the uniform setting (`rows`: unit name -> its report row), and move the originals "auto" keeps
    aside to the CPU (no longer in the layer, they would otherwise stay on the run's device)."""
    alternatives = check.alternatives.get(index, [])
    for k, (name, module, row) in enumerate(alternatives):
        if module is None:
            alternatives[k] = (name, layer.get_submodule(name), rows[name])
            check.reused += 1
    for _, original in check.originals.get(index, []):
        original.to("cpu")


def _own_inputs(run, check: BaselineCheck, index: int, inputs):
    """With own inputs, the uniform model's inputs to layer `index`: the allocated run's at the first compressed
    layer; after that its own hidden states, carried through any layers the run leaves dense."""
    if check.hidden is None:
        return inputs
    own = replace(inputs, hidden=check.hidden)
    for j in range(check.next_layer, index):
        with placement.on_device(run.layers[j], run.device):
            own = replace(inputs, hidden=run_layer(run.layers[j], own, run.device))
    return own


def decide(run, check: BaselineCheck) -> dict:
    """Measure both models on the held-out samples; keep the uniform layers when they do better."""
    t0 = time.time()
    layers, rows = run.layers, run.writer.rows
    allocated = {i: [(name, layers[i].get_submodule(name)) for name, _, _ in alts]
                 for i, alts in check.alternatives.items()}
    allocated_kl = _held_out_kl(run, check)
    uniform_kl = _held_out_kl(run, check, check.alternatives)
    inputs, shared_kl = ("own" if run.recipe.check_inputs == "own" else "shared"), None
    if run.recipe.check_inputs == "auto" and allocated_kl > SHARED_MARGIN * uniform_kl:
        shared_kl, inputs = uniform_kl, "own"
        _rebuild_on_own_inputs(run, check)
        uniform_kl = _held_out_kl(run, check, check.alternatives)
    kept = "uniform" if uniform_kl < allocated_kl else "allocation"
    if kept == "uniform":
        for i, alts in check.alternatives.items():
            rows[i] = {**rows[i], "rank_q": 0, "rank_k": 0, "units": [r for _, _, r in alts]}
    else:
        _put(layers, allocated)
    stored = sum(r["stored_bits"] for i in check.alternatives for r in rows[i]["units"])
    weights = sum(r["num_weights"] for i in check.alternatives for r in rows[i]["units"])
    check.seconds += time.time() - t0
    out = {"samples": sum(len(b["input_ids"]) for b in check.held), "allocation_kl": allocated_kl,
           "uniform_kl": uniform_kl, "uniform_setting": check.setting.label(), "uniform_bits": check.uniform_bits,
           "kept": kept, "inputs": inputs, "reused_units": check.reused, "kept_bits": stored / max(weights, 1),
           "seconds": check.seconds}
    if shared_kl is not None:
        out["shared_uniform_kl"] = shared_kl
    return out


def _held_out_kl(run, check: BaselineCheck, alternatives: dict | None = None) -> float:
    """KL(FP ‖ model) on the held-out samples, with `alternatives` (layer -> [(name, module, row)]) put in first."""
    if alternatives is not None:
        _put(run.layers, {i: [(n, m) for n, m, _ in alts] for i, alts in alternatives.items()})
    with offloaded(run.model, run.adapter, run.device):
        return kl_to_reference(run.model, check.held, check.reference, run.device)


def add_to_report(report: dict, checked: dict | None, samples: int) -> None:
    """`report["baseline_check"]` and its time in `phase_seconds` (it overlaps the layer pass)."""
    if checked is not None:
        report["baseline_check"] = {**checked, "share_of_run": checked["seconds"] / max(report["seconds"], 1e-9)}
        report["phase_seconds"]["baseline_check"] = checked["seconds"]
    elif samples:
        report["baseline_check"] = {"kept": "allocation", "skipped": "the uniform setting needs more bits than the target"}


def _put(layers, modules: dict[int, list]) -> None:
    for i, pairs in modules.items():
        for name, module in pairs:
            layers[i].set_submodule(name, module)
