"""Tiny random-weight models of every supported family, built in code (no hub)."""
from __future__ import annotations

import torch
import transformers as tf

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def _llava_like(config_cls, model_cls, **extra):
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )
    cfg = config_cls(
        vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_index=127, **extra
    )
    return model_cls(cfg)


def _qwen_vl(config_cls, model_cls):
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg = config_cls(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, out_hidden_size=64,
                           intermediate_size=64, in_chans=3, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=127, video_token_id=126, vision_start_token_id=125,
    )
    return model_cls(cfg)


BUILDERS = {
    "llava": lambda: _llava_like(tf.LlavaConfig, tf.LlavaForConditionalGeneration),
    "llava_next": lambda: _llava_like(
        tf.LlavaNextConfig, tf.LlavaNextForConditionalGeneration, image_grid_pinpoints=[[32, 32]]
    ),
    "llava_next_video": lambda: _llava_like(
        tf.LlavaNextVideoConfig, tf.LlavaNextVideoForConditionalGeneration,
        image_grid_pinpoints=[[32, 32]], video_token_index=126,
    ),
    "qwen2_vl": lambda: _qwen_vl(tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": lambda: _qwen_vl(tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**TEXT)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT)),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    model.eval()
    return model


def tiny_batches(model, n: int = 2, seq: int = 12, seed: int = 0) -> list[dict]:
    """Text-only batches; for LLaVA also one batch with an image."""
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, 120, (1, seq), generator=g)} for _ in range(n)]
    if type(model).__name__ == "LlavaForConditionalGeneration":
        n_img = (32 // 8) ** 2
        ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_img), 127), torch.randint(0, 120, (1, 5), generator=g)], 1)
        batches.append({"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)})
    return batches


def tiny_qwen_vl_image_batch(seed: int = 0) -> dict:
    """One Qwen2(.5)-VL batch with a 4×4-patch image (4 merged tokens), so M-RoPE positions differ per axis."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([[1, 125]]), torch.full((1, 4), 127), torch.randint(0, 120, (1, 6), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]])}


def tiny_padded_batch(seq: int = 12, pad: int = 3, seed: int = 0) -> dict:
    """Two text rows, the second left-padded by `pad` tokens (attention_mask 0 there)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return {"input_ids": torch.randint(0, 120, (2, seq), generator=g), "attention_mask": mask}
