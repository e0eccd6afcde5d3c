"""`casp info`: what this installation can do, the supported model families, or what a model directory holds."""
from __future__ import annotations

import platform

import torch


def describe(model=None) -> dict:
    import transformers

    import casp

    from casp.models.adapters import ADAPTERS, SUPPORTED_ARCHITECTURES
    from casp.io.hf_compat import load_config, rope_bases
    from casp.io.modelio import architecture_of, builtin_names, read_config, resolve_model_path
    from casp.quant.base import available_quantizers
    from casp.transforms.base import available_transforms

    if model is None:
        return {
            "casp": casp.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(),
            "supported_families": [ad.family for ad in ADAPTERS],
            "supported_architectures": list(SUPPORTED_ARCHITECTURES),
            "builtin_models": builtin_names() + ["(default) embedded tiny LLaVA"],
            "quantizers": ["none"] + available_quantizers(),
            "transforms": available_transforms(),
        }
    path = resolve_model_path(model)
    cfg = read_config(path)
    q = cfg.get("quantization_config") or {}
    out = {"path": str(path), "architecture": architecture_of(path), "compressed": q.get("quant_method") == "casp"}
    if out["compressed"]:
        out.update(average_bits=q.get("average_bits"), quantizer=q.get("quantizer"), qk_rank=q.get("qk_rank"),
                   target_bits=q.get("target_bits"))
    text = cfg.get("text_config", cfg)
    out.update(hidden_size=text.get("hidden_size"), num_layers=text.get("num_hidden_layers"),
               num_attention_heads=text.get("num_attention_heads"), num_key_value_heads=text.get("num_key_value_heads"))
    out["rope_theta"] = rope_bases(load_config(path))  # as this transformers will build it (either file format)
    return out


def families() -> list[dict]:
    """One row per supported family: its classes, what casp compresses, what stays 16-bit, and notes."""
    from casp.models.adapters import ADAPTERS

    rows = []
    for ad in ADAPTERS:
        kept = ["token embeddings", "norms", "lm_head"]
        if ad.is_multimodal:
            kept = ["vision tower"] + (["projector"] if ad.projector else []) + kept
        rows.append({
            "family": ad.family,
            "architectures": list(ad.architectures),
            "kind": "vision-language" if ad.is_multimodal else "causal LM",
            "compressed": ad.linear_names(),
            "low_rank_qk": ad.separate_qk,
            "kept_16bit": kept,
            "notes": ad.notes,
        })
    return rows


def format_families(rows: list[dict]) -> str:
    """The family table as text, one block per family."""
    lines = []
    for r in rows:
        lines.append(f"{r['family']}: {', '.join(r['architectures'])} ({r['kind']})")
        qk = "" if r["low_rank_qk"] else " (no low-rank Q/K)"
        lines.append(f"    compressed: decoder-layer linears {', '.join(r['compressed'])}{qk}")
        lines.append(f"    16-bit: {', '.join(r['kept_16bit'])}")
        if r["notes"]:
            lines.append(f"    notes: {r['notes']}")
    return "\n".join(lines)
