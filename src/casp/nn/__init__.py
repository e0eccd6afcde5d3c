"""casp's inference modules: `CaspLinear` subclasses, registered by kind and rebuilt from the JSON spec
saved in config.json (`module_from_spec`). The formats' matmul kernels are declared with the formats
(`casp.quant.kernel_registry`), not installed by importing this package."""
from casp.nn.base import MODULE_TYPES, CaspLinear, dense_weight_of, module_class, module_from_spec
from casp.nn.lowrank_linear import LowRankLinear
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear

__all__ = ["CaspLinear", "LowRankLinear", "MODULE_TYPES", "PackedLinear", "TransformedLinear", "dense_weight_of",
           "module_class", "module_from_spec"]
