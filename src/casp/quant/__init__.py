"""Quantizers (plug-ins registered by name) and the stored formats they write."""
from casp.quant.base import (
    QuantizedWeight,
    Quantizer,
    StorageFormat,
    available_quantizers,
    get_format,
    get_quantizer_class,
    quant_loss,
    register,
    register_format,
)
from casp.quant.scalar import QuantSpec
from casp.quant.rtn import RTN
from casp.quant.gptq import GPTQ, gptq_quantize
from casp.quant.e8 import E8Quantizer
from casp.quant.aqlm import AQLMQuantizer

__all__ = [
    "GPTQ",
    "RTN",
    "QuantSpec",
    "QuantizedWeight",
    "Quantizer",
    "StorageFormat",
    "available_quantizers",
    "get_format",
    "get_quantizer_class",
    "gptq_quantize",
    "quant_loss",
    "register",
    "register_format",
]
