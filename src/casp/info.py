"""`casp info`: what this installation can do, or what a model directory holds."""
from __future__ import annotations

import platform

import torch


def describe(model=None) -> dict:
    import transformers

    import casp

    from casp.models.adapters import SUPPORTED_ARCHITECTURES
    from casp.io.modelio import architecture_of, builtin_names, read_config, resolve_model_path
    from casp.quant.base import available_quantizers

    if model is None:
        return {
            "casp": casp.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(),
            "supported_architectures": list(SUPPORTED_ARCHITECTURES),
            "builtin_models": builtin_names() + ["(default) embedded tiny LLaVA"],
            "quantizers": ["none"] + available_quantizers(),
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
    return out
