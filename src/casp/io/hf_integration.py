"""Register "casp" with transformers' custom-quantization mechanism.

After `import casp`, `AutoModel*.from_pretrained(OUT)` (or the family class) sees
`quant_method: "casp"` in config.json, and this quantizer swaps the dense linears for
casp modules before the stored weights are loaded into them.
"""
from __future__ import annotations

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from casp.io.checkpoint import QUANT_METHOD
from casp.io.storage import install_modules


@register_quantization_config(QUANT_METHOD)
class CaspQuantizationConfig(QuantizationConfigMixin):
    def __init__(self, modules: dict | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@register_quantizer(QUANT_METHOD)
class CaspHfQuantizer(HfQuantizer):
    requires_calibration = True
    requires_parameters_quantization = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        install_modules(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def check_quantized_param(self, *args, **kwargs) -> bool:
        return False

    def update_dtype(self, dtype):
        return dtype

    def update_torch_dtype(self, dtype):
        return dtype

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
