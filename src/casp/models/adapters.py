"""Model families described by data: where the decoder layers and their linears live.

Each family is one `Adapter` row. Nothing here runs a model; the engine and the
pipeline read these tables to find the modules they work on.
"""
from __future__ import annotations

import sys
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
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    attention: str = "self_attn"
    multimodal_rope: bool = False

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

    def apply_rope(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings):
        """Apply the family's own rotary embedding to q, k shaped [batch, heads, seq, head_dim]."""
        cos, sin = position_embeddings
        module = sys.modules[type(attention).__module__]
        if self.multimodal_rope:
            section = attention.rope_scaling["mrope_section"]
            return module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
        return module.apply_rotary_pos_emb(q, k, cos, sin)


def _vlm(family, archs, *, vision="model.vision_tower", projector="model.multi_modal_projector", mrope=False):
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
    )


def _lm(family, archs):
    return Adapter(
        family=family,
        architectures=archs,
        layers="model.layers",
        final_norm="model.norm",
        rotary="model.rotary_emb",
        embed_tokens="model.embed_tokens",
    )


ADAPTERS: tuple[Adapter, ...] = (
    _vlm("llava", ("LlavaForConditionalGeneration",)),
    _vlm("llava_next", ("LlavaNextForConditionalGeneration",)),
    _vlm("llava_next_video", ("LlavaNextVideoForConditionalGeneration",)),
    _vlm("qwen2_vl", ("Qwen2VLForConditionalGeneration",), vision="model.visual", projector=None, mrope=True),
    _vlm("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), vision="model.visual", projector=None, mrope=True),
    _lm("llama", ("LlamaForCausalLM",)),
    _lm("mistral", ("MistralForCausalLM",)),
    _lm("qwen2", ("Qwen2ForCausalLM",)),
)

SUPPORTED_ARCHITECTURES = tuple(a for ad in ADAPTERS for a in ad.architectures)


def adapter_for_architecture(arch: str) -> Adapter:
    for ad in ADAPTERS:
        if arch in ad.architectures:
            return ad
    raise CaspError(
        f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_architecture(type(model).__name__)
