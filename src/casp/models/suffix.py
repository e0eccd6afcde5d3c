"""The original model's hidden states entering each decoder layer, kept for a few batches, so that a change
confined to decoder layer i is measured by running layers i.. and the head only.

The layer probes of `casp.steps.layer_scales` change one layer at a time and measure the model's output
distribution: from kept states a probe of layer i skips layers 0..i-1, on average half the stack.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from casp.models import placement
from casp.models.adapters import Adapter
from casp.models.engine import LayerInputs, head_logits, run_layer, walk_layers
from casp.models.offload import parts_on


@dataclass
class LayerStates:
    """`hidden[i]`: per batch, the input of decoder layer i (hidden[L]: the last layer's output); `inputs` carries the
    keyword arguments every layer type gets."""

    inputs: LayerInputs
    hidden: list[list[torch.Tensor]]


@torch.no_grad()
def layer_states(model: nn.Module, adapter: Adapter, batches: list[dict], device="cpu") -> LayerStates:
    """One walk of the model (as it is now) over `batches`, keeping every decoder layer's inputs (on the CPU)."""
    hidden, inputs = [], None
    last = len(adapter.decoder_layers(model)) - 1
    for step in walk_layers(model, adapter, batches, device=device, progress=False):
        inputs = step.inputs
        hidden.append(list(step.inputs.hidden))
        if step.index == last:
            hidden.append(run_layer(step.layer, step.inputs, device))
    return LayerStates(replace(inputs, hidden=[]), hidden)


@torch.no_grad()
def logits_from(model: nn.Module, adapter: Adapter, states: LayerStates, start: int, device="cpu"):
    """Per batch (a generator), the float32 logits of the model as it is now, run from decoder layer `start` on the
    kept inputs of that layer."""
    inputs = replace(states.inputs, hidden=states.hidden[start])
    for layer in adapter.decoder_layers(model)[start:]:
        with placement.on_device(layer, device):
            inputs = replace(inputs, hidden=run_layer(layer, inputs, device))
    with parts_on(model, adapter, device):
        for h in inputs.hidden:
            yield head_logits(model, adapter, h.to(device))
