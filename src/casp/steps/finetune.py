"""Step (optional, `--finetune-steps`): tune a compressed layer to the original layer's output.

A quantizer opts in with two attributes: `tunable_tensors` (names of stored tensors its format's
`dequantize` is differentiable in) and `layer_finetune_steps` (from its options; 0 turns it off).
After a decoder layer's units are replaced, those tensors (AQLM: codebooks and scales; codes stay fixed) become
float32 parameters. Adam minimises ‖layer_q(X) − layer_fp(X)‖² on the calibration inputs X, one
calibration batch per step in order; the format's own `dequantize` rebuilds each weight (it must be
differentiable in those tensors). The tuned values are rounded to the stored dtype and written back;
they are kept only if the layer-output MSE on all calibration batches goes down. Stored sizes do not
change. Deterministic: no randomness, batches in a fixed order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from casp.models.engine import LayerInputs, run_layer
from casp.models.placement import to_device
from casp.nn.packed_linear import PackedLinear
from casp.quant.base import QuantizedWeight, get_format

LEARNING_RATE = 1e-2   # Adam step, relative to each tensor's RMS (SmolLM2 layer 10, 40 steps: 1e-3 worse, 3e-2 no better)


def tunable_names(quantizer) -> tuple[str, ...]:
    """The stored tensors of `quantizer`'s format that fine-tuning may change (none by default)."""
    return tuple(getattr(quantizer, "tunable_tensors", ()))


def layer_finetune_steps(quantizer) -> int:
    """Adam steps per decoder layer that the quantizer's options ask for (0: no fine-tuning)."""
    return int(getattr(quantizer, "layer_finetune_steps", 0)) if tunable_names(quantizer) else 0


class _TunedLinear(nn.Module):
    """A `PackedLinear` whose tunable tensors are float32 parameters; the weight is rebuilt per call."""

    def __init__(self, packed: PackedLinear, names: tuple[str, ...]):
        super().__init__()
        self.packed = packed
        self.tuned = nn.ParameterDict({n: nn.Parameter(getattr(packed, n).detach().float().clone()) for n in names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.packed.quantized_weight()
        qw = QuantizedWeight({**qw.tensors, **dict(self.tuned.items())}, qw.meta)
        b = self.packed.bias.to(x.dtype) if self.packed.bias is not None else None
        return F.linear(x, get_format(qw.meta["format"]).dequantize(qw).to(x.dtype), b)


@dataclass
class FinetuneResult:
    """Layer-output MSE on the calibration data before and after; `kept`: the tuned values were written."""

    steps: int
    mse_before: float
    mse_after: float
    kept: bool
    seconds: float
    outputs: list[torch.Tensor]   # the layer's outputs as it is left (the next layer's inputs)

    def as_report(self) -> dict:
        return {"steps": self.steps, "mse_before": self.mse_before, "mse_after": self.mse_after,
                "kept": self.kept, "seconds": self.seconds}


def output_mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared difference over every element of every batch (float64 sums)."""
    total = sum(float(((o.double() - t.double()) ** 2).sum()) for o, t in zip(outputs, targets))
    return total / max(1, sum(t.numel() for t in targets))


def _layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    out = layer(hidden.to(device), **to_device(kwargs, device), use_cache=False)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Tuning:
    """How to tune a layer: the quantizer whose stored tensors are tuned, Adam steps, learning rate (relative to
    each tensor's RMS; None: `LEARNING_RATE`) and the device the layer runs on."""

    quantizer: object
    steps: int
    lr: float | None = None
    device: object = "cpu"


def finetune_layer(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], tuning: Tuning) -> FinetuneResult:
    """Tune the layer's stored tensors of the quantizer's format for `tuning.steps` Adam steps (see the module doc)."""
    quantizer, steps, device = tuning.quantizer, tuning.steps, tuning.device
    t0 = time.time()
    before_out = run_layer(layer, inputs, device)
    before = output_mse(before_out, targets)
    names = tunable_names(quantizer)
    packed = {n: m for n, m in layer.named_modules()
              if isinstance(m, PackedLinear) and m.meta["format"] == quantizer.format.name}
    if steps <= 0 or not names or not packed:
        return FinetuneResult(0, before, before, False, time.time() - t0, before_out)
    saved = {n: {t: getattr(m, t).clone() for t in names} for n, m in packed.items()}
    tuned = {n: _TunedLinear(m, names) for n, m in packed.items()}
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for n, t in tuned.items():
            layer.set_submodule(n, t)
        _adam(layer, tuned.values(), (inputs, targets), tuning)
    finally:
        for n, m in packed.items():
            layer.set_submodule(n, m)
        for p in frozen:
            p.requires_grad_(True)
    _write_back(packed, {n: dict(t.tuned.items()) for n, t in tuned.items()})
    after_out = run_layer(layer, inputs, device)
    after = output_mse(after_out, targets)
    if after >= before:
        _write_back(packed, saved)
        return FinetuneResult(steps, before, before, False, time.time() - t0, before_out)
    return FinetuneResult(steps, before, after, True, time.time() - t0, after_out)


def _adam(layer, tuned, data: tuple[LayerInputs, list[torch.Tensor]], tuning: Tuning) -> None:
    """`tuning.steps` Adam steps on the tuned tensors, batch `step mod batches` each; learning rate × each
    tensor's RMS."""
    inputs, targets = data
    steps, device = tuning.steps, tuning.device
    lr = LEARNING_RATE if tuning.lr is None else tuning.lr
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
              for t in tuned for p in t.tuned.values()]
    opt = torch.optim.Adam(groups)
    kwargs = inputs.kwargs_for(layer)
    hidden = list(inputs.hidden)
    with torch.enable_grad():
        for step in range(steps):
            i = step % len(hidden)
            opt.zero_grad(set_to_none=True)
            out = _layer_output(layer, hidden[i], kwargs[i], device)
            F.mse_loss(out.float(), targets[i].to(device).float()).backward()
            opt.step()


@torch.no_grad()
def _write_back(packed: dict, values: dict) -> None:
    """Copy `values` (per module, per tensor name) into the stored buffers, in their dtype."""
    for n, m in packed.items():
        for t, v in values[n].items():
            buf = getattr(m, t)
            buf.copy_(v.detach().to(buf.dtype))
        m.clear_cache()
