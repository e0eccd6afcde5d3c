"""Write a random-weight checkpoint with the exact shapes of a real model, for scale tests.

    python scripts/make_shaped_model.py OUT [--shape llava-1.5-7b] [--layers N] [--shard-gb 2] [--seed 0]

`llava-1.5-7b`: CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, MLP 4096, 16 heads), a 2-layer GELU
projector 1024 -> 4096 -> 4096, and Llama-2-7B (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary
32064). Weights are fp16, N(0, 0.02²) for matrices and embeddings, ones for norms, zeros for biases,
written tensor by tensor into ~`--shard-gb` safetensors shards with an index, so the whole model is never
in memory. Processor files: casp's embedded word-level tokenizer (its ids are all below the vocabulary
size) and a CLIP image processor at 336 px, so `casp compress` calibrates on text or images as usual.
`--layers` shortens the language model (same shapes per layer) for quick trials.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SHAPES = {
    "llava-1.5-7b": dict(vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
                         image_size=336, patch_size=14, lm_hidden=4096, lm_intermediate=11008, lm_layers=32,
                         lm_heads=32, lm_kv_heads=32, vocab=32064),
}


def build_config(shape: dict, image_token: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
                              num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
                              image_size=shape["image_size"], patch_size=shape["patch_size"],
                              projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["lm_hidden"],
                       intermediate_size=shape["lm_intermediate"], num_hidden_layers=shape["lm_layers"],
                       num_attention_heads=shape["lm_heads"], num_key_value_heads=shape["lm_kv_heads"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", architectures=["LlavaForConditionalGeneration"])


def build_processor(shape: dict):
    from transformers import CLIPImageProcessor, LlavaProcessor

    from casp.embedded.build import CHAT_TEMPLATE
    from casp.embedded.tokenizer import IMAGE, build_tokenizer

    size = shape["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                do_center_crop=True, do_resize=True, do_normalize=True, do_rescale=True)
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=shape["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE)


def random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * 0.02).half()


def write_checkpoint(out: Path, config, shard_bytes: int, seed: int) -> tuple[int, int]:
    """Stream random tensors of the model's shapes into shards; returns (parameters, shards)."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    with init_empty_weights():
        model = transformers.LlavaForConditionalGeneration(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in tqdm(shapes.items(), desc="tensors"):
        t = random_tensor(name, shape, gen)
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel()
    flush()
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, len(files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="language-model layers (default: the real count)")
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"make_shaped_model: {out} already exists", file=sys.stderr)
        return 2
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["lm_layers"] = args.layers
    processor = build_processor(shape)
    config = build_config(shape, processor.tokenizer.convert_tokens_to_ids(processor.image_token))
    out.mkdir(parents=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    params, shards = write_checkpoint(out, config, int(args.shard_gb * 2**30), args.seed)
    print(f"wrote {out}: {params / 1e9:.3f} B parameters in {shards} fp16 shards ({args.shape}, "
          f"{shape['lm_layers']} language-model layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
