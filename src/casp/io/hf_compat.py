"""Read checkpoints written by either major transformers version (4.57 or 5.x) with the version installed.

What differs between the two on disk, and what this module does about it:

- RoPE: 5.x writes `rope_parameters` ({"rope_type", "rope_theta", ...}, nested per layer type for
  Gemma 3) where 4.x wrote `rope_theta` / `rope_scaling` / `rope_local_base_freq`. 4.57 ignores
  `rope_parameters` and silently uses a base of 10000, so under 4.x `load_config` copies them into the
  4.x fields before the model is built. 5.x converts 4.x fields itself.
- Tokenizers: 5.x can name `"tokenizer_class": "TokenizersBackend"` and store `extra_special_tokens`
  as a list; 4.57 knows neither. `readable_tokenizer_dir` hands 4.x a copy of the small files whose
  tokenizer_config.json says the same thing in 4.x terms (the generic fast tokenizer over
  tokenizer.json, the list as `additional_special_tokens`).
- Weight names: `save_pretrained` writes some families under their historical key names, and each
  version has its own table for undoing that; `model_keys` asks the installed version's table. A
  vision tower created under a recent 5.x is saved without a wrapper level that 4.x (and 5.0)
  models have; `fill_unwrapped_tensors` loads those tensors into them.
- A GGUF import under 5.x stays tied to a GGUF quantizer that refuses to save; `drop_gguf_quantizer`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import transformers

from casp.errors import CaspError, first_line
from casp.io.checkpoint import read_config, read_json_object

MAJOR = int(transformers.__version__.split(".")[0])
# Keys of a flat `rope_parameters` that 4.x keeps outside `rope_scaling`.
_OUTSIDE_SCALING = ("rope_theta", "partial_rotary_factor")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


# ------------------------------------------------------------------ config and RoPE

def load_config(path: Path):
    """The model's config as the installed transformers reads it, with the RoPE and tying the checkpoint intends."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read a config is the user's directory
        raise CaspError(f"cannot load the config of {str(path)!r}: {first_line(e)}") from e
    if MAJOR < 5:
        for cfg in _config_tree(config):
            apply_rope_parameters(cfg)
        if saved_by_major(read_config(path)) >= 5:
            apply_v5_tying(config)
    return config


def saved_by_major(raw: dict) -> int:
    """The major transformers version that wrote a config.json (4 when it does not say)."""
    version = str(raw.get("transformers_version") or "4")
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else 4


def apply_v5_tying(config) -> None:
    """5.x ties the output embedding by the top-level `tie_word_embeddings`; 4.x asks the text config."""
    tie = vars(config).get("tie_word_embeddings")
    text = config.get_text_config(decoder=True)
    if tie is not None and text is not config:
        text.tie_word_embeddings = bool(tie)


def _config_tree(config) -> Iterator:
    """The config and every sub-config inside it (text, vision, ...), depth first."""
    yield config
    for value in vars(config).values():
        if isinstance(value, transformers.PretrainedConfig):
            yield from _config_tree(value)


def apply_rope_parameters(cfg) -> None:
    """Copy a 5.x `rope_parameters` into the 4.x fields that 4.x models read (no-op without it)."""
    params = getattr(cfg, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return
    if all(isinstance(v, dict) for v in params.values()):  # one entry per layer type (Gemma 3)
        full = params.get("full_attention")
        sliding = params.get("sliding_attention")
        if full is not None:
            _apply_flat(cfg, full)
        elif sliding is not None:
            _apply_flat(cfg, sliding)
        if sliding is not None and "rope_theta" in sliding and hasattr(cfg, "rope_local_base_freq"):
            cfg.rope_local_base_freq = float(sliding["rope_theta"])
        return
    _apply_flat(cfg, params)


def _apply_flat(cfg, params: dict) -> None:
    if "rope_theta" in params:
        cfg.rope_theta = float(params["rope_theta"])
    if "partial_rotary_factor" in params:
        cfg.partial_rotary_factor = params["partial_rotary_factor"]
    scaling = {k: v for k, v in params.items() if k not in _OUTSIDE_SCALING}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default" or set(scaling) - {"rope_type", "type"}:  # e.g. linear, llama3, M-RoPE sections
        scaling["rope_type"] = rope_type
        cfg.rope_scaling = scaling
    else:
        cfg.rope_scaling = None


def rope_bases(config) -> list[float]:
    """The distinct RoPE bases the installed version builds from this config (sorted), for `casp info` and tests."""
    bases = set()
    for cfg in _config_tree(config):
        params = getattr(cfg, "rope_parameters", None)
        if MAJOR >= 5 and isinstance(params, dict):
            nested = [v for v in params.values() if isinstance(v, dict)]
            bases |= {float(p["rope_theta"]) for p in (nested or [params]) if "rope_theta" in p}
        elif MAJOR < 5:
            bases |= {float(b) for b in (getattr(cfg, "rope_theta", None), getattr(cfg, "rope_local_base_freq", None))
                      if b is not None}
    return sorted(bases)


# ------------------------------------------------------------------ tokenizer files

def tokenizer_config_fixes(path: Path) -> dict | None:
    """tokenizer_config.json rewritten for the installed transformers, or None when it reads it as is."""
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return None
    tc = read_json_object(file)
    fixed = dict(tc)
    name = tc.get("tokenizer_class")
    if isinstance(name, str) and not _known_tokenizer_class(name) and (Path(path) / "tokenizer.json").is_file():
        fixed["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tc.get("extra_special_tokens")
    if MAJOR < 5 and isinstance(extra, list):
        additional = list(tc.get("additional_special_tokens") or [])
        fixed["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
        named = tc.get("model_specific_special_tokens")
        fixed["extra_special_tokens"] = dict(named) if isinstance(named, dict) else {}
    return fixed if fixed != tc else None


def _known_tokenizer_class(name: str) -> bool:
    """Whether the installed transformers has this tokenizer class (or its fast twin)."""
    return hasattr(transformers, name) or hasattr(transformers, name + "Fast")


@contextmanager
def readable_tokenizer_dir(path: Path):
    """`path` itself, or a temporary copy of its non-weight files with tokenizer_config.json fixed."""
    fixed = tokenizer_config_fixes(path)
    if fixed is None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="casp-tokenizer-") as tmp:
        for f in Path(path).iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, Path(tmp) / f.name)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(fixed, indent=2))
        yield Path(tmp)


# ------------------------------------------------------------------ weights

def model_keys(model, stored: list[str]) -> dict[str, str]:
    """Stored tensor name -> the model's parameter name, undoing `save_pretrained`'s historical renaming."""
    rename = _renamer_v5(model) if MAJOR >= 5 else _renamer_v4(model)
    return {key: rename(key) for key in stored}


def _renamer_v4(model):
    import re

    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}

    def rename(key: str) -> str:
        for pattern, repl in mapping.items():
            new, n = re.subn(pattern, repl, key)
            if n:
                return new
        return key

    return rename


def _renamer_v5(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) != len(transforms):
        raise CaspError(f"{type(model).__name__}: its checkpoint layout needs tensor conversions casp cannot undo")
    own = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def rename(key: str) -> str:
        for t in renamings:
            key, _ = t.rename_source_key(key)
        if key not in own and prefix and f"{prefix}.{key}" in own:
            key = f"{prefix}.{key}"
        return key

    return rename


def fill_unwrapped_tensors(model, path: Path, missing: list[str], unused: list[str]) -> list[str]:
    """Load the tensors a newer checkpoint stores one wrapper level higher; return the names still missing.

    A CLIP/SigLIP tower created under a recent 5.x is saved without the wrapper module level that 4.x
    and early 5.x models have. Each missing name must equal exactly one unused checkpoint name with the
    same single path segment added, and the shapes must agree; otherwise nothing is filled.
    """
    pairs = unwrapped_names(missing, unused)
    if not pairs:
        return missing
    from safetensors import safe_open

    target_of = {u: m for m, u in pairs.items()}
    params = model.state_dict()
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for raw, name in model_keys(model, list(f.keys())).items():
                target = target_of.get(name)
                if target is None:
                    continue
                tensor = f.get_tensor(raw)
                if tensor.shape != params[target].shape:
                    return missing
                params[target].copy_(tensor.to(params[target].dtype))
                del target_of[name]
    return sorted(target_of.values())


def unwrapped_names(missing: list[str], unused: list[str]) -> dict[str, str]:
    """missing name -> the unused name that is it without one segment, the same segment for all; {} if not so."""
    unused_set = set(unused)
    pairs, segments = {}, set()
    for name in missing:
        parts = name.split(".")
        found = [(".".join(parts[:i] + parts[i + 1:]), parts[i]) for i in range(1, len(parts) - 1)]
        found = [(u, seg) for u, seg in found if u in unused_set]
        if len(found) != 1:
            return {}
        pairs[name], seg = found[0]
        segments.add(seg)
    if len(segments) != 1 or len(set(pairs.values())) != len(pairs):
        return {}
    return pairs


def gguf_dense_kwargs() -> dict:
    """`from_pretrained` arguments that load a GGUF file as a dense model (recent 5.x may keep blocks packed)."""
    gguf_config = getattr(transformers, "GgufConfig", None)  # absent in 4.x and 5.0, which always dequantize
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def drop_gguf_quantizer(model) -> None:
    """Make a model loaded from GGUF (and dequantized) a plain model that `save_pretrained` accepts.

    transformers 5 keeps its GGUF quantizer attached after dequantizing, and refuses to save such a
    model; 4.x attaches none.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
