"""Tiny random-weight models of every supported family, built in code (no hub)."""
from __future__ import annotations

import inspect

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


SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
# ids of the VLMs' special tokens (the word-level processors of `tiny_processor` use the same ids)
IMAGE_ID, VIDEO_ID, BOI_ID, EOI_ID = 127, 126, 125, 124
GEMMA3_TEXT = dict(TEXT, head_dim=16, query_pre_attn_scalar=64, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"])


def _gemma3_vlm():
    cfg = tf.Gemma3Config(text_config=GEMMA3_TEXT, vision_config=SIGLIP, mm_tokens_per_image=4,
                          image_token_index=IMAGE_ID, boi_token_index=BOI_ID, eoi_token_index=EOI_ID)
    return tf.Gemma3ForConditionalGeneration(cfg)


def _fast_vlm():
    """FastVLM with a small MobileNetV2 tower (32×32 image → 1×1 map: one image token) and a Gemma 3 LM."""
    vision = tf.MobileNetV2Config(depth_multiplier=0.35, finegrained_output=False, image_size=32, tf_padding=False)
    vision.hidden_size = 448   # the tower's last width (1280 × 0.35, rounded to 8)
    cfg = tf.FastVlmConfig(vision_config=vision, text_config=dict(GEMMA3_TEXT, model_type="gemma3_text"),
                           image_token_index=IMAGE_ID, image_seq_length=1)
    return tf.FastVlmForConditionalGeneration(cfg)


def _idefics(config_cls, model_cls):
    """Idefics3 (SmolVLM) and SmolVLM2: pixel shuffle by 2 turns 4×4 patches into 4 image tokens."""
    cfg = config_cls(text_config=dict(TEXT, model_type="llama", pad_token_id=0), vision_config=SIGLIP,
                     scale_factor=2, image_token_id=IMAGE_ID)
    return model_cls(cfg)


def _llava_onevision():
    cfg = tf.LlavaOnevisionConfig(text_config=dict(TEXT, model_type="qwen2"),
                                  vision_config=dict(SIGLIP, model_type="siglip_vision_model"),
                                  image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=[[32, 32]])
    return tf.LlavaOnevisionForConditionalGeneration(cfg)


def _internvl():
    """InternVL 3.5 style: a Qwen3 language model (q/k norms) behind an InternViT tower."""
    cfg = tf.InternVLConfig(text_config=dict(TEXT, model_type="qwen3", head_dim=16),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
                            image_token_id=IMAGE_ID)
    return tf.InternVLForConditionalGeneration(cfg)


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
    "gemma3": _gemma3_vlm,
    "idefics3": lambda: _idefics(tf.Idefics3Config, tf.Idefics3ForConditionalGeneration),
    "smolvlm": lambda: _idefics(tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration),
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**TEXT, head_dim=16)),
    "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**GEMMA3_TEXT)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**TEXT, pad_token_id=0)),
    "fast_vlm": _fast_vlm,
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    model.eval()
    return model


def tiny_batches(model, n: int = 2, seq: int = 12, seed: int = 0) -> list[dict]:
    """Text-only batches; for LLaVA and the VLMs of `tiny_image_batch` also one batch with an image."""
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, 120, (1, seq), generator=g)} for _ in range(n)]
    if type(model).__name__ == "LlavaForConditionalGeneration":
        n_img = (32 // 8) ** 2
        ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_img), 127), torch.randint(0, 120, (1, 5), generator=g)], 1)
        batches.append({"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)})
    image = tiny_image_batch(model, seed)
    if image is not None:
        batches.append(image)
    return batches


# image placeholder tokens per 32×32 image, and the pixel layout each VLM's forward takes
_IMAGE_INPUTS = {
    "Gemma3ForConditionalGeneration": (4, lambda g: {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}),
    "Idefics3ForConditionalGeneration": (4, lambda g: {"pixel_values": torch.randn(1, 1, 3, 32, 32, generator=g)}),
    "SmolVLMForConditionalGeneration": (4, lambda g: {"pixel_values": torch.randn(1, 1, 3, 32, 32, generator=g)}),
    "InternVLForConditionalGeneration": (4, lambda g: {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}),
    # a 64×64 image is a 2×2 feature map: four image tokens
    "FastVlmForConditionalGeneration": (4, lambda g: {"pixel_values": torch.randn(1, 3, 64, 64, generator=g)}),
    # base image + one 32×32 grid tile: 16 + 4×(4+1 newline) features
    "LlavaOnevisionForConditionalGeneration": (36, lambda g: {"pixel_values": torch.randn(1, 2, 3, 32, 32, generator=g),
                                                              "image_sizes": torch.tensor([[32, 32]])}),
}


def tiny_image_batch(model, seed: int = 0, token_type_ids: bool = False) -> dict | None:
    """One batch with a 32×32 image between text tokens for the VLMs added with Gemma 3; None for other models.

    `token_type_ids` (Gemma 3) marks the image tokens as the Gemma 3 processor does, which makes
    them attend to each other bidirectionally.
    """
    spec = _IMAGE_INPUTS.get(type(model).__name__)
    if spec is None:
        return None
    n_img, pixels = spec
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.cat([torch.randint(0, 120, (1, 3), generator=g), torch.full((1, n_img), IMAGE_ID),
                     torch.randint(0, 120, (1, 6), generator=g)], 1)
    batch = {"input_ids": ids, **pixels(g)}
    if token_type_ids:
        batch["token_type_ids"] = (ids == IMAGE_ID).long()
    return batch


# transformers 5 computes M-RoPE positions from the processor's `mm_token_type_ids` (1 on image tokens)
_QWEN_VL_TAKES_TOKEN_TYPES = "mm_token_type_ids" in inspect.signature(tf.Qwen2VLForConditionalGeneration.forward).parameters


def tiny_qwen_vl_image_batch(seed: int = 0) -> dict:
    """One Qwen2(.5)-VL batch with a 4×4-patch image (4 merged tokens), so M-RoPE positions differ per axis."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([[1, 125]]), torch.full((1, 4), 127), torch.randint(0, 120, (1, 6), generator=g)], 1)
    batch = {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g),
             "image_grid_thw": torch.tensor([[1, 4, 4]])}
    if _QWEN_VL_TAKES_TOKEN_TYPES:
        batch["mm_token_type_ids"] = (ids == IMAGE_ID).int()
    return batch


def tiny_padded_batch(seq: int = 12, pad: int = 3, seed: int = 0) -> dict:
    """Two text rows, the second left-padded by `pad` tokens (attention_mask 0 there)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return {"input_ids": torch.randint(0, 120, (2, seq), generator=g), "attention_mask": mask}


# ------------------------------------------------------------------ tokenizers and processors
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %} assistant :{% endif %}")


def word_tokenizer(specials: dict[str, int] | None = None, named: dict[str, str] | None = None):
    """A 128-token word-level tokenizer over the embedded scenes' words, with `specials` at fixed ids.

    `named` gives the special tokens the family's processor looks up by attribute (e.g.
    {"image_token": "<image_soft_token>"}). Ids match `TEXT["vocab_size"]` and the VLM builders.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from casp.embedded.tokenizer import build_vocab

    specials = specials or {}
    words = [w for w in build_vocab() if w not in specials]
    taken = set(specials.values())
    free = (i for i in range(TEXT["vocab_size"]) if i not in taken)
    vocab = {w: next(free) for w in words}
    vocab.update({f"<unused{i}>": i for i in free})
    vocab.update(specials)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(["<pad>", "<unk>", "<s>", "</s>", *specials])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", extra_special_tokens=named or {}, padding_side="left",
                                      model_max_length=512)


def _gemma3_processor():
    names = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = word_tokenizer({names["image_token"]: IMAGE_ID, names["boi_token"]: BOI_ID, names["eoi_token"]: EOI_ID}, names)
    return tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                              image_seq_length=4, chat_template=CHAT_TEMPLATE.replace("IMAGE", names["boi_token"]))


def _idefics3_processor():
    tok = word_tokenizer({"<image>": IMAGE_ID, "<fake_token_around_image>": BOI_ID, "<end_of_utterance>": EOI_ID,
                          "<global-img>": VIDEO_ID})
    images = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
    return tf.Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"))


# Families whose image processor builds offline: their calibration goes through images and the processor.
# The LLaVA-OneVision, InternVL and SmolVLM2 processors also need a video processor, which needs
# torchvision (not installed here): those families calibrate on text through their tokenizer.
PROCESSORS = {"gemma3": _gemma3_processor, "idefics3": _idefics3_processor}


def tiny_processor(family: str):
    """The family's processor (image families of PROCESSORS) or a word-level tokenizer for the others."""
    return PROCESSORS[family]() if family in PROCESSORS else word_tokenizer()


def save_tiny_llama(out, *, hidden: int, intermediate: int, layers: int, kv_heads: int, max_positions: int,
                    **save_kwargs):
    """A random Llama (seed 0, 4 heads) with casp's embedded word-level tokenizer, saved in HF layout at `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from casp.embedded.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions)
    LlamaForCausalLM(cfg).save_pretrained(out, **save_kwargs)
    tok.save_pretrained(out)
    return out
