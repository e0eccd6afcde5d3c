"""casp: compress multimodal models (and LLMs) to ~2 bits with CASP.

Public API: `compress`, `load`, `CompressionConfig`, `resolve` / `Recipe` (the fully resolved run),
`RunOptions`. Importing casp also registers the
"casp" quantization method with transformers, so `from_pretrained(OUT)` works.
"""
from __future__ import annotations

__version__ = "0.1.0"

from casp.config import CompressionConfig  # noqa: E402
from casp.errors import CaspError  # noqa: E402
from casp.recipe import Recipe, resolve  # noqa: E402
from casp.run import RunOptions  # noqa: E402


def compress(model=None, out=None, config=None, **kwargs):
    """Compress `model` (a local HF directory, a built-in name, or None for the embedded model); `config` is a
    `CompressionConfig` or a `Recipe`. See `casp.pipeline.compress`."""
    from casp.pipeline import compress as _compress

    return _compress(model, out, config, **kwargs)


def load(path, dtype=None):
    """Load a casp-compressed (or dense) model directory as a transformers model."""
    import torch

    from casp.io.modelio import load_model, resolve_model_path

    return load_model(resolve_model_path(path), dtype=dtype or torch.float32)


def _register() -> None:
    try:
        from casp.io import hf_integration  # noqa: F401
    except Exception:  # registration is a convenience; casp.load works without it
        import logging

        logging.getLogger(__name__).debug("transformers registration failed", exc_info=True)


from casp.quant import rtn as _rtn, gptq as _gptq  # noqa: E402,F401  (register quantizers)

_register()

__all__ = ["compress", "load", "CompressionConfig", "Recipe", "resolve", "RunOptions", "CaspError", "__version__"]
