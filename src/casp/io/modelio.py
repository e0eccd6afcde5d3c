"""Resolve a model argument (directory, built-in name, or the embedded default) and load it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from casp.models.adapters import adapter_for_architecture
from casp.errors import CaspError
from casp.io.checkpoint import architecture_of, is_compressed, read_config

log = logging.getLogger(__name__)


def builtin_names() -> list[str]:
    from casp.models.real_models import BUILTIN_MODELS

    return sorted(BUILTIN_MODELS)


def resolve_model_path(model: str | Path | None) -> Path:
    """None -> the embedded model; a built-in name -> its cached conversion; else a local directory."""
    if model is None:
        from casp.embedded import EMBEDDED_MODEL_DIR

        return Path(EMBEDDED_MODEL_DIR)
    if isinstance(model, str) and model in builtin_names():
        from casp.models.real_models import resolve_builtin

        return Path(resolve_builtin(model))
    path = Path(model)
    if not path.exists():
        raise CaspError(f"model directory {str(path)!r} does not exist (built-in names: {', '.join(builtin_names())})")
    if not path.is_dir():
        raise CaspError(f"model path {str(path)!r} is not a directory")
    read_config(path)
    return path


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """Load a dense or casp-compressed model from a local directory (never from a hub)."""
    import transformers

    path = Path(path)
    arch = architecture_of(path)
    adapter_for_architecture(arch)
    if is_compressed(path):
        from casp.io.storage import load_compressed

        return load_compressed(path, dtype=dtype)
    cls = getattr(transformers, arch)
    try:
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CaspError(f"cannot load model weights from {str(path)!r}: {msg}") from None
    except Exception as e:  # safetensors raises its own error type on corrupt files
        if type(e).__name__ == "SafetensorError":
            raise CaspError(f"corrupt safetensors file in {str(path)!r}: {e}") from None
        raise
    model.eval()
    return model


def load_config(path: Path):
    """The model's transformers config, read from its local directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CaspError(f"cannot read the model config in {str(path)!r}: {msg}") from None


def load_processor(path: Path):
    """AutoProcessor for multimodal models, tokenizer for text-only ones."""
    from transformers import AutoProcessor, AutoTokenizer

    adapter = adapter_for_architecture(architecture_of(path))
    try:
        if adapter.is_multimodal:
            return AutoProcessor.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CaspError(f"cannot load the processor/tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from None


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)
