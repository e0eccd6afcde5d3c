"""Layer-by-layer execution of a decoder stack, GPTQ-style.

The inputs of decoder layer 0 are caught once (the rest of the model — vision tower,
projector, embeddings — runs exactly as in the model's own forward). Each layer is then
run on those inputs, observed through hooks, modified by the caller, and run again to
produce the next layer's inputs. Only the current layer needs to be on `device`.

Models that mix sliding-window and full-attention layers (Gemma 3, Qwen2 with
`max_window_layers`) give each layer the mask of its `attention_type`; those masks are
caught once per type, so every layer runs with the mask the model itself would give it.
"""
from __future__ import annotations

import resource
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from casp.data.scored import model_inputs
from casp.models import placement
from casp.models.adapters import Adapter
from casp.models.offload import parts_on
from casp.models.placement import to_device
from casp.nn.decoded import decoded


class _Caught(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a layer, and the keyword arguments the model passed with them.

    `kwargs` are those of layer 0; `typed` holds, per other attention type of the model's layers
    (e.g. "full_attention" next to "sliding_attention"), the keyword arguments a layer of that type gets.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    typed: dict[str, list[dict]] = field(default_factory=dict)
    type_of: Callable[[nn.Module], str | None] = lambda layer: None  # a layer's attention type (the adapter's)

    def __len__(self) -> int:
        return len(self.hidden)

    def kwargs_for(self, layer: nn.Module) -> list[dict]:
        """Per batch, the keyword arguments the model passes to `layer`."""
        return self.typed.get(self.type_of(layer), self.kwargs)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


_KEEP_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "cache_position",
                "position_embeddings_global", "position_embeddings_local")


def _catch_until_layer0(model: nn.Module, layer0: nn.Module, batches: list[dict], hidden: list | None) -> list[dict]:
    """Run the model on each batch until `layer0`; return the kwargs it gets (and append its hidden input)."""
    kwargs_out = []

    def hook(_module, args, kwargs):
        if hidden is not None:
            h = args[0] if args else kwargs["hidden_states"]
            hidden.append(h.detach().cpu())
        kwargs_out.append({k: to_device(kwargs.get(k), "cpu") for k in _KEEP_KWARGS if k in kwargs})
        raise _Caught

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**model_inputs(batch), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return kwargs_out


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, adapter: Adapter, batches: list[dict]) -> LayerInputs:
    """Run the model's own forward on each batch until decoder layer 0, and keep its inputs.

    Where the layers have several attention types, the model is run once more per other type
    with layer 0 posing as that type, to catch the mask the model builds for it.
    """
    layers = adapter.decoder_layers(model)
    layer0 = layers[0]
    caught = LayerInputs([], [], type_of=adapter.attention_type)
    caught.kwargs = _catch_until_layer0(model, layer0, batches, caught.hidden)
    own = adapter.attention_type(layer0)
    others = {t for t in map(adapter.attention_type, layers) if t is not None and t != own}
    for attention_type in sorted(others):
        with adapter.posing_as(layer0, attention_type):
            caught.typed[attention_type] = _catch_until_layer0(model, layer0, batches, None)
    return caught


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Run one decoder layer on every caught batch; returns outputs on the CPU. Its compressed linears
    are decoded once for the whole pass (`casp.nn.decoded`) rather than once per batch."""
    outs = []
    with decoded(layer, enabled=len(inputs.hidden) > 1):
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs_for(layer)):
            out = layer(hidden.to(device), **to_device(kwargs, device), use_cache=False)
            if isinstance(out, tuple):
                out = out[0]
            outs.append(out.detach().cpu())
    return outs


@torch.no_grad()
def final_hidden_states(model: nn.Module, adapter: Adapter, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = model.get_submodule(adapter.final_norm)
    return [norm(h) for h in hidden]


def head_logits(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from the last decoder layer's output: final norm, LM head, and the final soft cap where the
    model has one."""
    logits = model.get_output_embeddings()(model.get_submodule(adapter.final_norm)(hidden)).float()
    cap = getattr(adapter.text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# Tokens folded into a float32 XᵀX before it is added to the float64 sum: one in-place product per batch
# (no float64 temporary per batch), float32 rounding over at most this many tokens.
FLUSH_TOKENS = 16384


@dataclass
class SecondMoments:
    """XᵀX (float64, on the inputs' device) of the inputs of groups of linears that share one input."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, x: torch.Tensor) -> None:
        """Fold one batch in: accumulated in place in float32, moved into the float64 sum every FLUSH_TOKENS."""
        x = x.reshape(-1, x.shape[-1]).float()
        if key not in self._pending:
            self._pending[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self._pending_tokens[key] = 0
            self.tokens.setdefault(key, 0)
        self._pending[key].addmm_(x.T, x)
        self._pending_tokens[key] += x.shape[0]
        self.tokens[key] += x.shape[0]
        if self._pending_tokens[key] >= FLUSH_TOKENS:
            self._flush(key)

    def _flush(self, key: str) -> None:
        pending = self._pending.pop(key)
        self._pending_tokens.pop(key)
        if key in self.sums:
            self.sums[key] += pending.double()
        else:
            self.sums[key] = pending.double()

    @property
    def xtx(self) -> dict[str, torch.Tensor]:
        """Every group's XᵀX so far (float64)."""
        for key in list(self._pending):
            self._flush(key)
        return self.sums


@contextmanager
def record_second_moments(layer: nn.Module, groups: dict[str, tuple[str, ...]], moments: SecondMoments):
    """Accumulate XᵀX of each group's shared input while the layer runs."""
    handles = []
    for key, names in groups.items():
        module = layer.get_submodule(names[0])

        def hook(_m, args, key=key):
            moments.add(key, args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield moments
    finally:
        for h in handles:
            h.remove()


ATTENTION_TOKENS = 8192


@contextmanager
def record_attention_inputs(layer: nn.Module, adapter: Adapter, sink: list, max_tokens: int = ATTENTION_TOKENS):
    """Collect (normed attention input, position embeddings) per batch for attention analysis.

    Attention maps cost O(tokens × sequence length), so only the first batches up to
    `max_tokens` tokens are kept: density is a statistic and needs no more.
    """
    attn = layer.get_submodule(adapter.attention)
    state: dict = {"tokens": 0}

    def attn_hook(_m, args, kwargs):
        state["pos"] = kwargs.get("position_embeddings")

    def q_hook(_m, args):
        x = args[0]
        if state["tokens"] >= max_tokens:
            return
        state["tokens"] += x.shape[0] * x.shape[1]
        sink.append((x.detach().cpu(), to_device(state.get("pos"), "cpu")))

    handles = [
        attn.register_forward_pre_hook(attn_hook, with_kwargs=True),
        layer.get_submodule(adapter.q_proj).register_forward_pre_hook(q_hook),
    ]
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mb(device) -> float | None:
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


@dataclass
class LayerStep:
    """One decoder layer during a walk: its index, module and inputs. Set `outputs` to the layer's
    outputs on `inputs` when already computed, so the walker does not run the layer again."""

    index: int
    layer: nn.Module
    inputs: LayerInputs
    outputs: list[torch.Tensor] | None = None


def _replace(old, new):
    """`new`, after deleting the spill files of `old` (a spilling store)."""
    if hasattr(old, "drop"):
        old.drop()
    return new


def walk_layers(model: nn.Module, adapter: Adapter, batches: list[dict], *, device="cpu", only=None,
                desc: str = "layers", progress: bool = True, source=None, start: int = 0, hidden=None,
                on_done=None):
    """Yield a `LayerStep` per decoder layer (those in `only`, all by default), on `device`.

    The caller observes or modifies the layer inside its loop body; when it asks for the next
    layer, this layer is run (as modified) on its inputs to produce the next one's inputs. Layers
    not in `only` are just run. The one walker behind every layer-by-layer pass.

    `source` (`casp.models.streaming`) fetches each layer before use and releases it after, and
    stores the hidden states between layers; by default the model is in memory. `start` and
    `hidden` resume a walk at layer `start` with that layer's saved inputs. `on_done(i, inputs)`
    is called once layer i is finished, with the next layer's inputs.
    """
    from tqdm.auto import tqdm

    from casp.models.streaming import InMemoryLayers, trim_heap

    source = source or InMemoryLayers()
    source.open_rest()
    try:
        with parts_on(model, adapter, device):
            inputs = capture_layer0_inputs(model, adapter, to_device(batches, device))
    finally:
        source.close_rest()
    inputs.hidden = source.keep(inputs.hidden if hidden is None else hidden)
    layers = adapter.decoder_layers(model)
    last = len(layers) - 1
    bar = tqdm(range(start, len(layers)), desc=desc, disable=not progress, initial=start, total=len(layers))
    for i in bar:
        layer = layers[i]
        source.fetch(i, layer)
        if only is not None and i not in only:
            if i < last:
                with placement.on_device(layer, device):
                    inputs.hidden = _replace(inputs.hidden, source.keep(run_layer(layer, inputs, device)))
        else:
            step = LayerStep(i, layer, inputs)
            with placement.on_device(layer, device):
                yield step
                if i < last:
                    outputs = step.outputs if step.outputs is not None else run_layer(layer, inputs, device)
                    inputs.hidden = _replace(inputs.hidden, source.keep(outputs))
        if on_done is not None:
            on_done(i, layer, inputs)
        source.release(i, layer)
        trim_heap()
