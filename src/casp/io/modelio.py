"""Resolve a model argument (directory, built-in name, or the embedded default) and load it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from casp.models.adapters import adapter_for_architecture
from casp.errors import CaspError, first_line
from casp.io.checkpoint import architecture_of, is_compressed, read_config
from casp.io.hf_compat import fill_unwrapped_tensors, load_config, readable_tokenizer_dir

log = logging.getLogger(__name__)


def builtin_names() -> list[str]:
    from casp.models.real_models import builtin_names as names

    return names()


def model_source(model) -> Path:
    """The directory a model comes from: a model in memory's `name_or_path`, else `resolve_model_path`."""
    from torch import nn

    if isinstance(model, nn.Module):
        return Path(getattr(model.config, "_name_or_path", "") or ".")
    return resolve_model_path(model)


def resolve_model_path(model: str | Path | None) -> Path:
    """None -> the embedded model; a built-in name -> its cached conversion; else a local directory."""
    if model is None:
        from casp.embedded import EMBEDDED_MODEL_DIR

        return Path(EMBEDDED_MODEL_DIR)
    if isinstance(model, str) and model in builtin_names():
        from casp.models.real_models import BuiltinModelError, resolve_builtin

        try:
            return Path(resolve_builtin(model))
        except BuiltinModelError as e:
            raise CaspError(str(e)) from None
    path = Path(model)
    if not path.exists():
        raise CaspError(f"model directory {str(path)!r} does not exist (built-in names: {', '.join(builtin_names())})")
    if not path.is_dir():
        raise CaspError(f"model path {str(path)!r} is not a directory")
    read_config(path)
    return path


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """Load a dense or casp-compressed model from a local directory (never from a hub).

    The config goes through `hf_compat.load_config`, so a checkpoint saved by either transformers
    major version gets the RoPE it was saved with. Any failure is a one-line CaspError.
    """
    import transformers

    path = Path(path)
    arch = architecture_of(path)
    adapter_for_architecture(arch)
    if is_compressed(path):
        from casp.io.storage import load_compressed

        return load_compressed(path, dtype=dtype)
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise CaspError(f"transformers {transformers.__version__} has no class {arch} (named by {str(path)!r})")
    config = load_config(path)
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                          output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - missing, truncated or mismatched weights; safetensors' own error type
        raise CaspError(f"cannot load model weights from {str(path)!r}: {first_line(e)}") from e
    _check_loading_info(model, path, info)
    model.eval()
    return model


def _check_loading_info(model, path: Path, info: dict) -> None:
    """Refuse a model some of whose tensors the checkpoint did not fill: transformers would leave them random."""
    import transformers

    unused = sorted(info.get("unexpected_keys") or ())
    missing = fill_unwrapped_tensors(model, path, sorted(info.get("missing_keys") or ()), unused)
    missing = sorted(set(missing) | {m[0] for m in info.get("mismatched_keys") or ()})
    if not missing:
        return
    hint = f"; {len(unused)} checkpoint tensors went unused (e.g. {unused[0]})" if unused else ""
    raise CaspError(f"cannot load model weights from {str(path)!r}: {len(missing)} of the model's tensors are not in "
                    f"the checkpoint (e.g. {missing[0]}){hint}; does it come from another transformers version "
                    f"than {transformers.__version__}?")


def load_processor(path: Path):
    """AutoProcessor for multimodal models, tokenizer for text-only ones (files of either transformers version)."""
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(path)
    adapter = adapter_for_architecture(architecture_of(path))
    loader = AutoProcessor if adapter.is_multimodal else AutoTokenizer
    try:
        with readable_tokenizer_dir(path) as readable:
            processor = loader.from_pretrained(readable, local_files_only=True)
    except CaspError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers and processors fail with any exception type
        raise CaspError(f"cannot load the processor/tokenizer from {str(path)!r}: {first_line(e)}") from e
    tokenizer = tokenizer_of(processor)
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):  # some versions load an empty one
        raise CaspError(f"the tokenizer in {str(path)!r} has no vocabulary beyond its special tokens "
                        "(no tokenizer.json or vocabulary files?)")
    return processor


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)
