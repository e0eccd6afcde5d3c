"""Model families described by data: where the decoder layers and their linears live.

Each family is one `Adapter` row. The engine and the pipeline read these tables to find
the modules they work on; no other module names a family's modules. The one piece of
attention maths that depends on the family — the exact queries, keys, score scale and
sliding window the model's attention uses — is `Adapter.attention_qk`.

Families casp does not list are refused with one line naming the supported ones and, where
known, the reason (mixture-of-experts layers, a decoder layer without the expected linears).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from casp.errors import CaspError

LLAMA_LINEARS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
# Phi-3: one fused W_qkv and one fused W_gate|up
FUSED_LINEARS = {
    "attn_in": ("self_attn.qkv_proj",),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_up_proj",),
    "mlp_out": ("mlp.down_proj",),
}
MOE_REASON = "mixture-of-experts layers are not supported (casp compresses dense decoder linears only)"


@dataclass(frozen=True)
class AttentionQK:
    """What one attention layer scores: softmax(q·kᵀ·scale) over causal keys within `window`.

    q is [batch, seq, heads, head_dim] and k [batch, seq, kv_heads, head_dim], both after
    the q/k norms and RoPE; `window` is the layer's sliding window (a query sees the last
    `window` keys, itself included), None for full causal attention.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    window: int | None = None


def sliding_window(attention: nn.Module) -> int | None:
    """The sliding window of one HF attention module, None if it attends to every earlier key.

    Qwen2(-VL), Qwen3 and Gemma 3 set `sliding_window` on the module (None on full layers);
    Mistral reads `config.sliding_window` for every layer; others have `config.layer_types`.
    """
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    cfg = getattr(attention, "config", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None and getattr(attention, "layer_idx", None) is not None:
        if types[attention.layer_idx] != "sliding_attention":
            return None
    return getattr(cfg, "sliding_window", None)


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family (dotted paths from the top-level model)."""

    family: str
    architectures: tuple[str, ...]
    layers: str
    final_norm: str
    rotary: str
    embed_tokens: str
    vision_tower: str | None = None
    projector: str | None = None
    text_config_attr: str | None = None
    linears: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_LINEARS))
    # dotted paths inside a decoder layer
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    attention: str = "self_attn"
    input_norm: str = "input_layernorm"   # the norm whose output the attention reads
    q_norm: str = "self_attn.q_norm"      # per-head norms of q and k, used where present (Qwen3, Gemma 3)
    k_norm: str = "self_attn.k_norm"
    multimodal_rope: bool = False
    # False where W_q and W_k are rows of one fused W_qkv (Phi-3): `q_proj`/`k_proj` then name that
    # fused linear, low-rank Q/K is refused, and `attention_qk` splits its output into q and k
    separate_qk: bool = True
    notes: str = ""   # what is special about the family's attention or layout (for `casp info --families`)
    # optional family hook: attention module → its sliding window (None: full causal)
    window: Callable[[nn.Module], int | None] = sliding_window

    @property
    def is_multimodal(self) -> bool:
        return self.vision_tower is not None

    def text_config(self, model: nn.Module):
        cfg = model.config
        return getattr(cfg, self.text_config_attr) if self.text_config_attr else cfg

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def qk_name(self, p: str) -> str:
        """Dotted path of W_q ("q") or W_k ("k") inside a decoder layer."""
        return {"q": self.q_proj, "k": self.k_proj}[p]

    def linear_names(self) -> list[str]:
        return [name for group in self.linears.values() for name in group]

    def attention_geometry(self, model: nn.Module) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) of the language model."""
        tc = self.text_config(model)
        heads = tc.num_attention_heads
        kv = getattr(tc, "num_key_value_heads", None) or heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return heads, kv, head_dim

    def attention_type(self, layer: nn.Module) -> str | None:
        """The attention type ("sliding_attention", "full_attention", ...) whose mask and RoPE the model gives `layer`.

        transformers 4.x keeps it on the decoder layer; 5.x looks it up in `config.layer_types` by layer index.
        """
        own = getattr(layer, "attention_type", None)
        if own is not None:
            return own
        attention = layer.get_submodule(self.attention)
        types = getattr(getattr(attention, "config", None), "layer_types", None)
        index = getattr(attention, "layer_idx", None)
        return types[index] if types is not None and index is not None else None

    @contextmanager
    def posing_as(self, layer: nn.Module, attention_type: str):
        """Within the block, the model treats `layer` as a layer of `attention_type` (its mask and RoPE)."""
        if hasattr(layer, "attention_type"):
            own, layer.attention_type = layer.attention_type, attention_type
            try:
                yield
            finally:
                layer.attention_type = own
            return
        attention = layer.get_submodule(self.attention)
        config, index = attention.config, attention.layer_idx
        own = config.layer_types
        config.layer_types = [attention_type if i == index else t for i, t in enumerate(own)]
        try:
            yield
        finally:
            config.layer_types = own

    def apply_rope(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings):
        """Apply the family's own rotary embedding to q, k shaped [batch, heads, seq, head_dim]."""
        cos, sin = position_embeddings
        module = sys.modules[type(attention).__module__]
        if self.multimodal_rope and hasattr(module, "apply_multimodal_rotary_pos_emb"):
            # transformers 4.x and early 5.x: cos/sin carry all three M-RoPE axes and the attention picks each
            # section's axis; later 5.x merges the sections inside the rotary embedding (plain RoPE below)
            rope = getattr(attention, "rope_scaling", None) or attention.rope_parameters
            return module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, rope["mrope_section"])
        return module.apply_rotary_pos_emb(q, k, cos, sin)

    def _in_attention(self, attention: nn.Module, path: str, required: bool = True) -> nn.Module | None:
        """The module at `path` (a path inside the decoder layer), found from the attention module."""
        prefix = self.attention + "."
        if not path.startswith(prefix):
            raise CaspError(f"{self.family}: {path!r} is not inside the attention module {self.attention!r}")
        try:
            return attention.get_submodule(path[len(prefix):])
        except AttributeError:
            if required:
                raise CaspError(f"{self.family}: {type(attention).__name__} has no {path!r}") from None
            return None

    def attention_qk(self, attention: nn.Module, x: torch.Tensor, position_embeddings,
                     q_proj: nn.Module | None = None, k_proj: nn.Module | None = None) -> AttentionQK:
        """The exact queries, keys, score scale and window of `attention` on its input `x` [b, t, hidden].

        `x` is the attention module's input (the output of the layer's input norm) and
        `position_embeddings` the (cos, sin) the model passed to it (None: no RoPE). `q_proj` /
        `k_proj` replace the layer's own projections (e.g. low-rank ones being measured); the
        q/k norms, RoPE, scale and window are always the layer's own.
        """
        softcap = getattr(attention, "attn_logit_softcapping", None) or getattr(
            getattr(attention, "config", None), "attn_logit_softcapping", None)
        if softcap:
            raise CaspError(f"{self.family}: attention logit soft-capping is not supported")
        scale = getattr(attention, "scaling", None)
        if scale is None:
            raise CaspError(f"{self.family}: {type(attention).__name__} has no `scaling`; its score scale is unknown")
        head_dim = attention.head_dim
        b, t, _ = x.shape
        if self.separate_qk:
            q_proj = q_proj if q_proj is not None else self._in_attention(attention, self.q_proj)
            k_proj = k_proj if k_proj is not None else self._in_attention(attention, self.k_proj)
            q = q_proj(x).view(b, t, -1, head_dim)
            k = k_proj(x).view(b, t, -1, head_dim)
        else:
            q, k = self._split_fused_qk(attention, x, q_proj, k_proj)
        q_norm = self._in_attention(attention, self.q_norm, required=False)
        k_norm = self._in_attention(attention, self.k_norm, required=False)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        if position_embeddings is not None:
            qt, kt = self.apply_rope(attention, q.transpose(1, 2), k.transpose(1, 2), position_embeddings)
            q, k = qt.transpose(1, 2), kt.transpose(1, 2)
        return AttentionQK(q=q, k=k, scale=float(scale), window=self.window(attention))

    def _split_fused_qk(self, attention: nn.Module, x: torch.Tensor, q_proj, k_proj):
        """q and k [b, t, heads, head_dim] from a fused W_qkv, whose output rows are [q | k | v]."""
        if q_proj is not None or k_proj is not None:
            raise CaspError(f"{self.family}: W_q and W_k are fused into {self.q_proj!r}; they cannot be replaced "
                            "separately (low-rank Q/K needs separate projections)")
        cfg = attention.config
        head_dim = attention.head_dim
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        b, t, _ = x.shape
        qkv = self._in_attention(attention, self.q_proj)(x)
        q = qkv[..., :heads * head_dim].reshape(b, t, heads, head_dim)
        k = qkv[..., heads * head_dim:(heads + kv) * head_dim].reshape(b, t, kv, head_dim)
        return q, k


def _vlm(family, archs, *, vision="model.vision_tower", projector="model.multi_modal_projector", mrope=False,
         notes=""):
    return Adapter(
        family=family,
        architectures=archs,
        layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        rotary="model.language_model.rotary_emb",
        embed_tokens="model.language_model.embed_tokens",
        vision_tower=vision,
        projector=projector,
        text_config_attr="text_config",
        multimodal_rope=mrope,
        notes=notes,
    )


def _idefics(family, archs, notes):
    """Idefics3 / SmolVLM: the language model is `model.text_model`, the projector `model.connector`."""
    return Adapter(
        family=family,
        architectures=archs,
        layers="model.text_model.layers",
        final_norm="model.text_model.norm",
        rotary="model.text_model.rotary_emb",
        embed_tokens="model.text_model.embed_tokens",
        vision_tower="model.vision_model",
        projector="model.connector",
        text_config_attr="text_config",
        notes=notes,
    )


def _lm(family, archs, **extra):
    return Adapter(
        family=family,
        architectures=archs,
        layers="model.layers",
        final_norm="model.norm",
        rotary="model.rotary_emb",
        embed_tokens="model.embed_tokens",
        **extra,
    )


QK_NORMS = "per-head q/k RMS norms"
GEMMA3 = (f"{QK_NORMS}; score scale query_pre_attn_scalar^-1/2; sliding-window and full-attention layers "
          "alternate (config.layer_types)")

ADAPTERS: tuple[Adapter, ...] = (
    _vlm("llava", ("LlavaForConditionalGeneration",), notes="CLIP tower + MLP projector; Llama-style language model"),
    _vlm("llava_next", ("LlavaNextForConditionalGeneration",), notes="anyres image tiles"),
    _vlm("llava_next_video", ("LlavaNextVideoForConditionalGeneration",), notes="image and video tokens"),
    _vlm("llava_onevision", ("LlavaOnevisionForConditionalGeneration",),
         notes="SigLIP tower + MLP projector, anyres tiles; Qwen2 language model"),
    _vlm("fast_vlm", ("FastVlmForConditionalGeneration",),
         notes="CNN tower (FastViT, or MobileNetV2 in casp's fashion-vlm) whose flattened feature map feeds an MLP "
               "projector; any language model transformers knows"),
    _vlm("qwen2_vl", ("Qwen2VLForConditionalGeneration",), vision="model.visual", projector=None, mrope=True,
         notes="M-RoPE (3-axis positions); the patch merger is part of the vision tower"),
    _vlm("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), vision="model.visual", projector=None, mrope=True,
         notes="M-RoPE (3-axis positions); the patch merger is part of the vision tower"),
    _vlm("gemma3", ("Gemma3ForConditionalGeneration",),
         notes=f"{GEMMA3}; image tokens attend bidirectionally within their image (casp's attention statistics "
               "treat them as causal)"),
    _vlm("internvl", ("InternVLForConditionalGeneration",),
         notes=f"InternViT tower + MLP projector; Qwen2 (InternVL3) or Qwen3 (InternVL3.5, {QK_NORMS}) language model"),
    _idefics("idefics3", ("Idefics3ForConditionalGeneration",),
             notes="SmolVLM: SigLIP tower + pixel-shuffle connector; Llama language model"),
    _idefics("smolvlm", ("SmolVLMForConditionalGeneration",),
             notes="SmolVLM2: the Idefics3 layout (SigLIP tower + pixel-shuffle connector; Llama language model)"),
    _lm("llama", ("LlamaForCausalLM",)),
    _lm("mistral", ("MistralForCausalLM",), notes="sliding window on every layer (config.sliding_window)"),
    _lm("qwen2", ("Qwen2ForCausalLM",), notes="optional sliding window from max_window_layers on"),
    _lm("qwen3", ("Qwen3ForCausalLM",), notes=f"{QK_NORMS}; optional sliding window from max_window_layers on"),
    _lm("gemma3_text", ("Gemma3ForCausalLM",), notes=GEMMA3),
    _lm("phi3", ("Phi3ForCausalLM",), linears=dict(FUSED_LINEARS), q_proj="self_attn.qkv_proj",
        k_proj="self_attn.qkv_proj", separate_qk=False,
        notes="fused W_qkv and W_gate|up, each compressed as one linear; W_qkv stays dense (a forced low rank is refused); "
              "optional sliding window on every layer"),
)

SUPPORTED_ARCHITECTURES = tuple(a for ad in ADAPTERS for a in ad.architectures)


def supported_families() -> str:
    """One line: every family and its architectures, for error messages and `casp info --families`."""
    return ", ".join(f"{ad.family} ({'/'.join(ad.architectures)})" for ad in ADAPTERS)


def _is_moe_name(arch: str) -> bool:
    return "moe" in arch.lower() or arch.startswith(("Mixtral", "DeepseekV2", "DeepseekV3", "Dbrx", "Jamba"))


def adapter_for_architecture(arch: str) -> Adapter:
    for ad in ADAPTERS:
        if arch in ad.architectures:
            return ad
    reason = MOE_REASON if _is_moe_name(arch) else "casp has no adapter for this family"
    raise CaspError(f"unsupported architecture {arch!r}: {reason}; supported: {supported_families()}")


def _has_experts(module: nn.Module) -> bool:
    return any("expert" in name.lower() for name, _ in module.named_modules())


def check_layers(model: nn.Module, adapter: Adapter) -> None:
    """Refuse a model whose decoder layers lack the family's linears (e.g. a VLM around an MoE language model)."""
    layers = adapter.decoder_layers(model)
    qk = {adapter.q_proj, adapter.k_proj} if adapter.separate_qk else set()
    for i, layer in enumerate(layers):
        for name in adapter.linear_names():
            try:
                layer.get_submodule(name)
            except AttributeError:
                if _has_experts(layer):
                    what, reason = repr(name), MOE_REASON
                elif name in qk:
                    what, reason = f"separate {name!r} projection", "W_q and W_k must be separate linears (fused checkpoint?)"
                else:
                    what, reason = repr(name), f"its decoder layers differ from the {adapter.family} family's"
                raise CaspError(f"unsupported model {type(model).__name__}: decoder layer {i} has no {what}; "
                                f"{reason}; supported: {supported_families()}") from None


def adapter_for(model: nn.Module) -> Adapter:
    """The family's adapter, after checking that every decoder layer holds the family's linears."""
    adapter = adapter_for_architecture(type(model).__name__)
    check_layers(model, adapter)
    return adapter
