"""A model whose decoder layers stay on disk until the layer walk reaches them.

`load_streamed(path)` builds the model with its parameters on the meta device (no memory),
then reads from the safetensors only what runs before and after the decoder stack (vision
tower, projector, embeddings, final norm, LM head) in float32. `LayerStream` is what the
layer walker (`casp.models.engine.walk_layers`) asks for a layer: `fetch` reads that layer's
tensors, `release` returns them to the meta device, and `keep` stores the hidden states
between layers in fp16 with a memory cap (`SpillingActivations`). Peak memory is then about
the non-layer parts + one decoder layer + the activations held in memory.

`InMemoryLayers` is the same interface for a model that is already loaded whole: it does nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError
from casp.io.lazy_checkpoint import LazyCheckpoint, model_key_map
from casp.models.activations import SpillingActivations
from casp.models.adapters import Adapter, adapter_for


class InMemoryLayers:
    """Layers of a model loaded whole: nothing to fetch or release; activations kept as float32 lists."""

    streamed = False

    def fetch(self, index: int, layer: nn.Module) -> None:
        pass

    def release(self, index: int, layer: nn.Module) -> None:
        pass

    def keep(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return hidden


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that share storage with another weight (e.g. an LM head tied to the embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    names = set(tied if not isinstance(tied, dict) else tied.keys())
    if not getattr(model.config, "tie_word_embeddings", getattr(model.config.get_text_config(), "tie_word_embeddings",
                                                                 False)):
        return set()
    return {k for k in model.state_dict() if any(k == t or k.endswith("." + t) or t.endswith(k) for t in names)}


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if leaf in target._parameters:
        target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        target._buffers[leaf] = tensor


class LayerStream:
    """Decoder layers read from the checkpoint on demand; hidden states in fp16 under a memory cap."""

    streamed = True

    def __init__(self, model: nn.Module, adapter: Adapter, checkpoint: LazyCheckpoint, keymap: dict[str, str],
                 dtype: torch.dtype = torch.float32, max_bytes: int | None = None, spill_dir: Path | None = None):
        self.model, self.adapter, self.checkpoint, self.keymap = model, adapter, checkpoint, keymap
        self.dtype, self.max_bytes, self.spill_dir = dtype, max_bytes, spill_dir

    def layer_keys(self, index: int) -> dict[str, str]:
        """Layer-local tensor name -> checkpoint name, for decoder layer `index`."""
        prefix = f"{self.adapter.layers}.{index}."
        return {k[len(prefix):]: v for k, v in self.keymap.items() if k.startswith(prefix)}

    def fetch(self, index: int, layer: nn.Module) -> None:
        for name, key in self.layer_keys(index).items():
            t = self.checkpoint.get(key)
            _assign(layer, name, t.to(self.dtype) if t.is_floating_point() else t)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")

    def keep(self, hidden: list[torch.Tensor]) -> SpillingActivations:
        return SpillingActivations(hidden, max_bytes=self.max_bytes, spill_dir=self.spill_dir)


def load_streamed(path: str | Path, *, dtype: torch.dtype = torch.float32, max_bytes: int | None = None,
                  spill_dir: Path | None = None) -> tuple[nn.Module, LayerStream]:
    """The model with only its non-layer parts in memory, and the stream of its decoder layers."""
    import transformers
    from accelerate import init_empty_weights

    from casp.io.checkpoint import architecture_of
    from casp.io.modelio import load_config

    path = Path(path)
    cls = getattr(transformers, architecture_of(path))
    config = load_config(path)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    checkpoint = LazyCheckpoint(path)
    names = list(model.state_dict().keys())
    keymap = model_key_map(names, checkpoint.keys(), getattr(model, "_checkpoint_conversion_mapping", None),
                           tied_keys(model))
    layer_prefix = adapter.layers + "."
    for name in names:
        if name.startswith(layer_prefix) or name not in keymap:
            continue
        t = checkpoint.get(keymap[name])
        expected = tuple(model.get_parameter(name).shape) if _is_param(model, name) else None
        if expected is not None and tuple(t.shape) != expected:
            raise CaspError(f"checkpoint tensor {keymap[name]!r} has shape {tuple(t.shape)}, the config says {expected}")
        _assign(model, name, t.to(dtype) if t.is_floating_point() else t)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(layer_prefix)]
    if still_meta:
        raise CaspError(f"the checkpoint in {str(path)!r} holds no weight for {still_meta[0]!r}")
    model.eval()
    return model, LayerStream(model, adapter, checkpoint, keymap, dtype, max_bytes, spill_dir)


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (model.get_submodule(owner) if owner else model)._parameters
