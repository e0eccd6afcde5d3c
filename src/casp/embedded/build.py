"""Processor, config and untrained model of the embedded tiny LLaVA.

The model is a standard ``LlavaForConditionalGeneration``: a small CLIP vision
tower (64x64 image, 8-pixel patches -> 64 patch tokens + CLS), a 2-layer GELU
projector and a Llama language model with grouped-query attention. The
"default" feature strategy drops CLS, so each image becomes exactly 64 visual
tokens and the processor expands ``<image>`` to the same 64.
"""

from __future__ import annotations

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from casp.embedded.scenes import IMAGE_SIZE
from casp.embedded.tokenizer import BOS, EOS, IMAGE, PAD, build_tokenizer

PATCH_SIZE = 8
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 (CLS dropped)

# LLaVA-1.5 prompt format: "USER: <image>\n{question} ASSISTANT:" ; answers end with </s>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Default architecture; build_config(**overrides) changes any of these.
DEFAULTS = dict(
    vision_hidden=128,
    vision_intermediate=512,
    vision_layers=3,
    vision_heads=4,
    lm_hidden=256,
    lm_intermediate=512,
    lm_layers=6,
    lm_heads=8,
    lm_kv_heads=2,
)


def build_image_processor() -> CLIPImageProcessor:
    """64x64 in, 64x64 out: no resize or crop, rescale to [0, 1] then normalise to [-1, 1]."""
    return CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LlavaProcessor that expands ``<image>`` to ``NUM_VISUAL_TOKENS`` tokens, with the chat template."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast | None = None, **overrides) -> LlavaConfig:
    """LlavaConfig of the embedded model (see DEFAULTS for the knobs)."""
    tokenizer = tokenizer or build_tokenizer()
    p = {**DEFAULTS, **overrides}
    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden"],
        intermediate_size=p["vision_intermediate"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=p["vision_hidden"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=p["lm_hidden"],
        intermediate_size=p["lm_intermediate"],
        num_hidden_layers=p["lm_layers"],
        num_attention_heads=p["lm_heads"],
        num_key_value_heads=p["lm_kv_heads"],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab[IMAGE],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=NUM_VISUAL_TOKENS,
        multimodal_projector_bias=True,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        tie_word_embeddings=False,
    )


def build_model(config: LlavaConfig, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """Randomly initialised model for a config; generation stops at ``</s>``."""
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = config.bos_token_id, config.eos_token_id, config.pad_token_id
    gc.do_sample = False
    return model
