"""A model whose decoder layers stay on disk until the layer walk reaches them.

`load_streamed(path)` builds the model with its parameters on the meta device (no memory).
`LayerStream` is what the layer walker (`casp.models.engine.walk_layers`) asks for weights:
`open_rest` / `close_rest` read and drop what runs around the decoder stack (vision tower,
projector, embeddings, final norm, LM head) — needed only while the walk catches layer 0's
inputs, or for the loss — `fetch` reads one decoder layer, `release` returns it to the meta
device, and `keep` stores the hidden states between layers in fp16 with a memory cap
(`SpillingActivations`). Everything is float32 while in memory; peak memory is about the larger
of (the non-layer parts) and (one decoder layer + its compression's work) + the activations.

`InMemoryLayers` is the same interface for a model that is already loaded whole: it does nothing.
"""
from __future__ import annotations

import math
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

    def open_rest(self) -> None:
        pass

    def close_rest(self) -> None:
        pass


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that share storage with another weight (e.g. an LM head tied to the embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    names = set(tied if not isinstance(tied, dict) else tied.keys())
    if not getattr(model.config, "tie_word_embeddings", getattr(model.config.get_text_config(), "tie_word_embeddings",
                                                                 False)):
        return set()
    return {k for k in model.state_dict() if any(k == t or k.endswith("." + t) or t.endswith(k) for t in names)}


def trim_heap() -> None:
    """Hand freed heap memory back to the system: glibc keeps it otherwise, and the many differently sized
    temporaries of a layer's work fragment the heap until RSS is far above what is in use."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if leaf in target._parameters:
        target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        target._buffers[leaf] = tensor


class LayerStream:
    """Decoder layers (and the parts around them) read from the checkpoint on demand."""

    streamed = True

    def __init__(self, model: nn.Module, adapter: Adapter, checkpoint: LazyCheckpoint, keymap: dict[str, str],
                 dtype: torch.dtype = torch.float32, max_bytes: int | None = None, spill_dir: Path | None = None):
        self.model, self.adapter, self.checkpoint, self.keymap = model, adapter, checkpoint, keymap
        self.dtype, self.max_bytes, self.spill_dir = dtype, max_bytes, spill_dir
        prefix = adapter.layers + "."
        self.rest_keys = {k: v for k, v in keymap.items() if not k.startswith(prefix)}

    def _load(self, module: nn.Module, names: dict[str, str]) -> None:
        tensors = self.checkpoint.get_many(names.values())
        for name, key in names.items():
            t = tensors.pop(key)
            _assign(module, name, t.to(self.dtype) if t.is_floating_point() else t)

    def open_rest(self) -> None:
        """Read every weight outside the decoder layers (float32)."""
        self._load(self.model, self.rest_keys)
        self.model.tie_weights()

    def close_rest(self) -> None:
        for name in self.rest_keys:
            _assign(self.model, name, torch.empty_like(self.model.get_parameter(name) if _is_param(self.model, name)
                                                       else self.model.get_buffer(name), device="meta"))
        trim_heap()

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """The non-layer weights as stored (fp16 floats), named as in the model, tied copies left out."""
        tied = tied_keys(self.model)
        names = {k: v for k, v in self.rest_keys.items() if k not in tied}
        tensors = self.checkpoint.get_many(names.values())
        return {k: (tensors[v].half() if tensors[v].is_floating_point() else tensors[v]).contiguous()
                for k, v in names.items()}

    def layer_keys(self, index: int) -> dict[str, str]:
        """Layer-local tensor name -> checkpoint name, for decoder layer `index`."""
        prefix = f"{self.adapter.layers}.{index}."
        return {k[len(prefix):]: v for k, v in self.keymap.items() if k.startswith(prefix)}

    def fetch(self, index: int, layer: nn.Module) -> None:
        self._load(layer, self.layer_keys(index))

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")
        trim_heap()

    def keep(self, hidden: list[torch.Tensor]) -> SpillingActivations:
        return SpillingActivations(hidden, max_bytes=self.max_bytes, spill_dir=self.spill_dir)


def load_streamed(path: str | Path, *, dtype: torch.dtype = torch.float32, max_bytes: int | None = None,
                  spill_dir: Path | None = None) -> tuple[nn.Module, LayerStream]:
    """The model with only its non-layer parts in memory, and the stream of its decoder layers."""
    import transformers
    from accelerate import init_empty_weights

    from casp.io.checkpoint import architecture_of
    from casp.io.hf_compat import load_config, model_keys, unwrapped_names

    path = Path(path)
    cls = getattr(transformers, architecture_of(path))
    config = load_config(path)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    checkpoint = LazyCheckpoint(path)
    names = list(model.state_dict().keys())
    tied = tied_keys(model)
    renamed = model_keys(model, checkpoint.keys())  # checkpoint name -> model name, by the installed transformers
    found, own = set(renamed.values()), set(names)
    unwrapped = unwrapped_names([n for n in names if n not in found and n not in tied], sorted(found - own))
    back = {u: m for m, u in unwrapped.items()}  # a vision tower saved without its wrapper level
    original = {back.get(r, r): ck for ck, r in renamed.items()}
    keymap = {m: original[r] for m, r in model_key_map(names, list(original), None, tied).items()}
    source = LayerStream(model, adapter, checkpoint, keymap, dtype, max_bytes, spill_dir)
    shapes = {k: checkpoint.shape(v) for k, v in keymap.items()}
    wrong = [k for k, v in model.state_dict().items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        raise CaspError(f"checkpoint tensor {keymap[wrong[0]]!r} has shape {shapes[wrong[0]]}, the config says "
                        f"{tuple(model.state_dict()[wrong[0]].shape)}")
    model.eval()
    return model, source


def available_memory() -> int:
    """Bytes the system can give this process now (MemAvailable), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def too_big_for_memory(path: str | Path, fraction: float = 0.5) -> bool:
    """Whether the model in `path`, in float32, would take more than `fraction` of the available memory."""
    free = available_memory()
    if not free:
        return False
    checkpoint = LazyCheckpoint(path)
    params = sum(math.prod(checkpoint.shape(k)) for k in checkpoint.keys())
    return 4 * params > fraction * free


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (model.get_submodule(owner) if owner else model)._parameters
