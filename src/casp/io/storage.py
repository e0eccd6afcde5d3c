"""Save and load compressed models in Hugging Face conventions, atomically, without pickle.

OUT/config.json carries `quantization_config` (quant_method "casp") listing every replaced
module by its `CaspLinear.spec()`: low-rank Q/K (`{"type": "lowrank", "rank": r}`), packed matrices
(the quantizer's metadata), transforms. Loading rebuilds each through the module registry
(`casp.nn.module_from_spec`). Weights are safetensors; dense parts are stored in fp16 and the
in-memory model is rounded through fp16 before saving, so a reload gives identical logits.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError
from casp.io.checkpoint import QUANT_METHOD, architecture_of, read_config
from casp.io.hf_compat import load_config, model_keys, unwrapped_names
from casp.nn.base import CaspLinear, module_class

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CaspError(f"output {str(out)!r} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CaspError(f"output {str(out)!r} exists and is not a directory")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise CaspError(f"the parent directory of {str(out)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CaspError(f"cannot write into {str(parent)!r}")


@contextmanager
def atomic_dir(out: Path):
    """Yield a temp dir beside `out`; on success it replaces `out`, on any failure it vanishes."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def module_specs(model: nn.Module) -> dict[str, dict]:
    """Every casp module in the model, as JSON: what `load_compressed` must rebuild before loading weights."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, CaspLinear)}


def install_modules(model: nn.Module, specs: dict[str, dict]) -> None:
    """Replace dense linears by empty casp modules of the recorded shapes (parents before children)."""
    for name in sorted(specs, key=lambda n: n.count(".")):
        spec = specs[name]
        try:
            cls = module_class(spec.get("type"))
        except KeyError:
            raise CaspError(f"unknown casp module type {spec.get('type')!r} for {name}") from None
        model.set_submodule(name, cls.from_spec(spec))


def round_through_fp16(model: nn.Module) -> None:
    """Make in-memory float tensors equal to what fp16 storage will give back."""
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.dtype == torch.float32:
                t.data.copy_(t.data.half().float())


def quantization_config(modules: dict[str, dict], report: dict, config) -> dict:
    """The `quantization_config` entry of OUT/config.json: every casp module and the run's settings."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": modules,
        "average_bits": report["average_bits"],
        "target_bits": config.bits,
        "quantizer": config.quantizer,
        "transform": config.transform,
        "qk_rank": config.qk_rank,
        "layers": [{k: v for k, v in u.items() if k in ("name", "setting", "bits", "group_size", "sym", "rank")}
                   for u in report["layers"]],
    }


def storage_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors as stored: floating point in fp16, codes as they are; names prefixed."""
    return {prefix + k: (v.half() if v.is_floating_point() and v.dtype != torch.float16 else v).contiguous()
            for k, v in module.state_dict().items()}


def save_compressed(result, out: Path, overwrite: bool = False) -> Path:
    """Write model, processor files, report and plots into a temp dir beside OUT, then rename it into place."""
    from casp.report import write_report

    out = Path(out)
    check_output_dir(out, overwrite)
    model = result.model
    round_through_fp16(model)
    with atomic_dir(out) as tmp:
        qcfg = quantization_config(module_specs(model), result.report, result.config)
        model.config.quantization_config = qcfg
        try:
            model.save_pretrained(tmp, state_dict=storage_state_dict(model), safe_serialization=True,
                                  max_shard_size="2GB")
        finally:
            del model.config.quantization_config
        for fname in PROCESSOR_FILES:
            src = Path(result.source) / fname
            if src.is_file() and not (tmp / fname).exists():
                shutil.copy2(src, tmp / fname)
        result.report["stored_bytes_on_disk"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        write_report(result.report, tmp)
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CaspError(f"{str(path)!r} holds no .safetensors weights")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise CaspError(f"corrupt safetensors file {str(f)!r}: {e}") from None
    return sd


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a casp-compressed model from OUT: config -> empty model -> casp modules -> weights."""
    import transformers

    path = Path(path)
    cfg_dict = read_config(path)
    qcfg = cfg_dict.get("quantization_config") or {}
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise CaspError(f"{str(path)!r} is not a casp-compressed model")
    cls = getattr(transformers, architecture_of(path))
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):   # parameters on the meta device: no dense fp32 model first
        model = cls._from_config(config, dtype=dtype)
    install_modules(model, qcfg["modules"])
    stored = _read_state_dict(path)
    names = model_keys(model, list(stored))
    sd = {}
    for key in list(stored):
        value = stored.pop(key)
        sd[names[key]] = value.to(dtype) if value.is_floating_point() else value
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    pairs = unwrapped_names(missing, unexpected)  # a vision tower saved without its wrapper level (hf_compat)
    if pairs:
        model.load_state_dict({m: sd[u] for m, u in pairs.items()}, strict=False, assign=True)
        missing = [k for k in missing if k not in pairs]
        unexpected = [k for k in unexpected if k not in set(pairs.values())]
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise CaspError(f"weights in {str(path)!r} do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise CaspError(f"weights in {str(path)!r} do not match its config (missing {still_empty[:3]})")
    if (path / "generation_config.json").exists():   # `_from_config` does not read it: stop tokens, pad id
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.eval()
    return model


@torch.no_grad()
def dense_equivalent(module: CaspLinear) -> nn.Linear:
    """The plain float32 linear a casp module computes: its `dense_weight()` and `dense_bias()`."""
    bias = module.dense_bias()
    lin = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    lin.weight.copy_(module.dense_weight())
    if bias is not None:
        lin.bias.copy_(bias.float())
    return lin


def export_dense(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a plain fp16 checkpoint: every casp module replaced by the dense linear it computes."""
    src, dst = Path(src), Path(dst)
    check_output_dir(dst, overwrite)
    model = load_compressed(src)
    outer = [n for n, m in model.named_modules() if isinstance(m, CaspLinear)]
    outer = [n for n in outer if not any(n.startswith(o + ".") for o in outer)]
    for name in outer:
        model.set_submodule(name, dense_equivalent(model.get_submodule(name)))
    with atomic_dir(dst) as tmp:
        model.half().save_pretrained(tmp, safe_serialization=True)
        for fname in PROCESSOR_FILES:
            if (src / fname).is_file() and not (tmp / fname).exists():
                shutil.copy2(src / fname, tmp / fname)
    return dst
