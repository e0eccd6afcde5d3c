"""Weight transforms applied before any quantizer and undone at inference (plug-ins by name)."""
from casp.transforms.base import (
    TransformParams,
    WeightTransform,
    available_transforms,
    get_transform_class,
    register_transform,
    restore_weight,
    transform_weight,
    transform_xtx,
)
from casp.transforms.incoherence import Incoherence
from casp.transforms.scaled_incoherence import ScaledIncoherence

__all__ = [
    "Incoherence",
    "ScaledIncoherence",
    "TransformParams",
    "WeightTransform",
    "available_transforms",
    "get_transform_class",
    "register_transform",
    "restore_weight",
    "transform_weight",
    "transform_xtx",
]
