"""Step (optional, `--finetune-steps N`): tune a compressed layer to the original layer's output.

After a decoder layer's units are replaced, its continuous stored parameters become float32 parameters,
with every code fixed:
- the tensors each packed format declares `tunable` (scalar: group scales; E8P: the per-matrix stage
  scales; AQLM: codebooks and scales), inside transforms and low-rank factors alike;
- the stored tensors each weight transform declares `tunable` (`incoherence-scaled`: its fp16 row and
  column vectors, QuIP#'s SU / SV);
- every floating parameter of the layer itself: norms, biases, and any linear kept in 16 bits (an
  unquantized low-rank factor among them).
Adam minimises ‖layer_q(X) − layer_fp(X)‖² on the calibration inputs X (inputs from the already
compressed layers below), `SAMPLES_PER_STEP` samples per step in order; the formats' own `dequantize`
rebuilds each weight. The last eighth of the batches (at least one) is held out: the tuned values, rounded to their
stored dtypes, are kept only if the layer-output error on those batches goes down. Stored sizes and
bits never change. Deterministic: no randomness, batches in a fixed order.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from casp.models.engine import LayerInputs, run_layer
from casp.models.placement import to_device
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear
from casp.quant.base import QuantizedWeight, get_format

LEARNING_RATE = 1e-2   # Adam step, relative to each tensor's RMS (SmolLM2 layer 10, 40 steps: 1e-3 worse, 3e-2 no better)
SAMPLES_PER_STEP = 2   # calibration samples per Adam step: a step costs a layer's forward and backward on them
HELD_SHARE = 8         # one calibration batch in this many decides whether the tuned values are kept


def tunable_names(module: PackedLinear) -> tuple[str, ...]:
    """The stored tensors of a packed module that fine-tuning may change (its format's `tunable`)."""
    return tuple(get_format(module.meta["format"]).tunable)


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


def transform_tunables(module: nn.Module) -> tuple[str, ...]:
    """A transformed linear's stored tensors that fine-tuning may change (its transform's `tunable`), by
    their attribute names."""
    if not isinstance(module, TransformedLinear):
        return ()
    return tuple(TransformedLinear.prefix + t for t in module.transform.tunable)


class _Sides:
    """The tunable buffers of transformed linears turned into float32 parameters in place, and back."""

    def __init__(self, module: nn.Module):
        self.owners = {n: (m, transform_tunables(m)) for n, m in module.named_modules() if transform_tunables(m)}
        self.stored = {n: {t: getattr(m, t).clone() for t in names} for n, (m, names) in self.owners.items()}

    def enter(self) -> list[nn.Parameter]:
        params = []
        for m, names in self.owners.values():
            for t in names:
                p = nn.Parameter(m._buffers.pop(t).detach().float().clone())
                m.register_parameter(t, p)
                params.append(p)
        return params

    def exit(self, kept: bool) -> None:
        for n, (m, names) in self.owners.items():
            for t in names:
                p = m._parameters.pop(t)
                old = self.stored[n][t]
                m.register_buffer(t, p.detach().to(old.dtype) if kept else old.clone())

    @torch.no_grad()
    def revert(self) -> None:
        for n, (m, names) in self.owners.items():
            for t in names:
                getattr(m, t).copy_(self.stored[n][t])


class Trainable:
    """The continuous stored parameters of a module (a decoder layer or a whole model) made trainable.

    A context manager: on entry the packed modules are swapped for `_TunedLinear`s, and every floating
    parameter (norms, biases, 16-bit linears) is made float32 and trainable; `parameters` lists them all.
    `keep()` leaves the trained values in the stored tensors, rounded to their dtypes; on exit without
    `keep()` everything is as it was, to the bit, and `revert()` undoes a kept result later.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.packed = {n: m for n, m in module.named_modules() if isinstance(m, PackedLinear) and tunable_names(m)}
        self.plain = {n: p for n, p in module.named_parameters() if p.is_floating_point()}
        self.sides = _Sides(module)
        self.tuned: dict[str, _TunedLinear] = {}
        self.kept = False
        self._saved: dict = {}
        self._side_params: list[nn.Parameter] = []

    def __bool__(self) -> bool:
        return bool(self.packed or self.plain or self.sides.owners)

    def __enter__(self) -> "Trainable":
        self._side_params = self.sides.enter()
        self._saved = {n: (p.data, p.requires_grad) for n, p in self.plain.items()}
        self._stored = {n: {t: getattr(m, t).clone() for t in tunable_names(m)} for n, m in self.packed.items()}
        self.tuned = {n: _TunedLinear(m, tunable_names(m)) for n, m in self.packed.items()}
        for n, t in self.tuned.items():
            self.module.set_submodule(n, t)
        for p in self.plain.values():
            p.data = p.data.float().clone()
            p.requires_grad_(True)
        return self

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every trainable tensor: the packed formats' tunable tensors, the transforms', then the floating
        parameters."""
        return [p for t in self.tuned.values() for p in t.tuned.values()] + self._side_params + \
            list(self.plain.values())

    def keep(self) -> None:
        """Leave the trained values in place when the context exits."""
        self.kept = True

    def __exit__(self, *exc) -> None:
        self.sides.exit(self.kept)
        for n, m in self.packed.items():
            self.module.set_submodule(n, m)
        with torch.no_grad():
            if self.kept:
                for n, m in self.packed.items():
                    for t, v in self.tuned[n].tuned.items():
                        getattr(m, t).copy_(v.detach().to(getattr(m, t).dtype))
            for m in self.packed.values():
                m.clear_cache()
            for n, p in self.plain.items():
                old, grad = self._saved[n]
                p.data = p.data.detach().to(old.dtype) if self.kept else old
                p.requires_grad_(grad)

    @torch.no_grad()
    def revert(self) -> None:
        """After a kept exit: every stored tensor back to its value before training."""
        for n, m in self.packed.items():
            for t, v in self._stored[n].items():
                getattr(m, t).copy_(v)
            m.clear_cache()
        for n, p in self.plain.items():
            p.data = self._saved[n][0]
        self.sides.revert()
        self.kept = False


@dataclass
class FinetuneResult:
    """Layer-output MSE on the held-out batches before and after; `kept`: the tuned values were written."""

    steps: int
    mse_before: float
    mse_after: float
    kept: bool
    seconds: float
    outputs: list[torch.Tensor]   # the layer's outputs on every batch as it is left (the next layer's inputs)

    def as_report(self) -> dict:
        return {"steps": self.steps, "mse_before": self.mse_before, "mse_after": self.mse_after,
                "kept": self.kept, "seconds": self.seconds}


def output_mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared difference over every element of every batch (float64 sums)."""
    total = sum(float(((o.double() - t.double()) ** 2).sum()) for o, t in zip(outputs, targets))
    return total / max(1, sum(t.numel() for t in targets))


def split_held(n: int) -> int:
    """How many of `n` batches (the last ones) decide whether tuning is kept: one in `HELD_SHARE`, at
    least one; none when there is a single batch (it then both trains and decides)."""
    return 0 if n < 2 else max(1, n // HELD_SHARE)


def _layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    out = layer(hidden.to(device), **to_device(kwargs, device), use_cache=False)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Tuning:
    """How to tune a layer: Adam steps, learning rate (relative to each tensor's RMS; None: `LEARNING_RATE`),
    the device the layer runs on, and calibration samples per step."""

    steps: int
    lr: float | None = None
    device: object = "cpu"
    rows: int = SAMPLES_PER_STEP


def finetune_layer(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], tuning: Tuning) -> FinetuneResult:
    """Tune the layer's continuous stored parameters for `tuning.steps` Adam steps (see the module doc)."""
    t0 = time.time()
    device = tuning.device
    n = len(inputs)
    held = list(range(n - split_held(n), n)) or list(range(n))
    before_out = run_layer(layer, inputs, device)
    before = output_mse([before_out[i] for i in held], [targets[i] for i in held])
    trainable = Trainable(layer)
    if tuning.steps <= 0 or not trainable:
        return FinetuneResult(0, before, before, False, time.time() - t0, before_out)
    train = [i for i in range(n) if i not in held] or held
    with trainable:
        _adam(layer, trainable.parameters, (inputs, targets, train), tuning)
        trainable.keep()
    after_out = run_layer(layer, inputs, device)   # as stored: the tuned values rounded to their dtypes
    after = output_mse([after_out[i] for i in held], [targets[i] for i in held])
    if not after < before:   # NaN included
        trainable.revert()
        return FinetuneResult(tuning.steps, before, before, False, time.time() - t0, before_out)
    return FinetuneResult(tuning.steps, before, after, True, time.time() - t0, after_out)


def relative_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with one group per tensor, its step `lr` × the tensor's RMS (scales and norms differ by orders)."""
    return torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
                             for p in params])


def _rows(value, rows: slice, n: int):
    """`value` (a tensor, or tuples / lists / dicts of them) cut to the batch rows `rows` wherever its first
    dimension is the batch of `n` rows; everything else (shared masks, positions) as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows] if n > 1 and value.dim() and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    return value


def minibatches(inputs: LayerInputs, train: list[int], rows: int) -> list[tuple[int, slice]]:
    """(batch, rows) of every training step in turn: each training batch cut into pieces of `rows` samples."""
    return [(i, slice(j, j + rows)) for i in train for j in range(0, inputs.hidden[i].shape[0], rows)]


def _adam(layer, params, data: tuple[LayerInputs, list[torch.Tensor], list[int]], tuning: Tuning) -> None:
    """`tuning.steps` Adam steps, each on `tuning.rows` samples of the training batches, in turn."""
    inputs, targets, train = data
    opt = relative_adam(params, LEARNING_RATE if tuning.lr is None else tuning.lr)
    kwargs = inputs.kwargs_for(layer)
    pieces = minibatches(inputs, train, tuning.rows)
    with torch.enable_grad():
        for step in range(tuning.steps):
            i, rows = pieces[step % len(pieces)]
            n = inputs.hidden[i].shape[0]
            opt.zero_grad(set_to_none=True)
            out = _layer_output(layer, inputs.hidden[i][rows], _rows(kwargs[i], rows, n), tuning.device)
            F.mse_loss(out.float(), targets[i][rows].to(tuning.device).float()).backward()
            opt.step()
