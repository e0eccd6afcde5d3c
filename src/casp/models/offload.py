"""A whole-model forward with the model on the CPU: each decoder layer visits `--device` for its own forward.

`parts_on` puts every tensor outside the decoder layers (embeddings, vision tower, projector, final
norm, LM head: small next to the stack) on the device for a block and puts the CPU originals back
after. `offloaded` adds hooks that bring each decoder layer to the device just before its forward
and send it back just after, so evaluations, the search's KL and layer 0's input capture run on the
device with peak device memory = the parts around the stack + one layer + its activations.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from casp.models import placement
from casp.models.adapters import Adapter


@contextmanager
def parts_on(model: nn.Module, adapter: Adapter, device):
    """Every parameter and buffer outside the decoder layers on `device` for the block; the CPU ones after."""
    prefix = adapter.layers + "."
    params, buffers, seen = [], [], set()
    for name, module in model.named_modules():
        if name == adapter.layers or name.startswith(prefix):
            continue
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append((p, p.data))
        for key, b in module._buffers.items():
            if b is not None:
                buffers.append((module, key, b))
    try:
        for p, data in params:
            p.data = data.to(device)
        for module, key, b in buffers:
            module._buffers[key] = b.to(device)
        yield model
    finally:
        for p, data in params:
            p.data = data
        for module, key, b in buffers:
            module._buffers[key] = b


@contextmanager
def offloaded(model: nn.Module, adapter: Adapter, device):
    """`model` runs with its parts on `device` and each decoder layer moved there for its own forward.

    On plain "cpu" nothing is moved and no hook is added.
    """
    if not placement.off_cpu(device):
        yield model
        return
    layers = adapter.decoder_layers(model)

    def bring(layer, _args):
        placement.place(layer, device)

    def send_back(layer, _args, _out):
        placement.place(layer, placement.CPU)

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(bring, prepend=True))
        handles.append(layer.register_forward_hook(send_back))
    try:
        with parts_on(model, adapter, device):
            yield model
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            if any(p.device != placement.CPU for p in layer.parameters()):
                placement.place(layer, placement.CPU)
