"""casp's inference modules, each rebuildable from the JSON spec saved in config.json."""
from casp.nn.lowrank_linear import LowRankLinear
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear
import casp.nn.cpu_kernels  # noqa: F401  registers the scalar format's CPU kernel
import casp.nn.e8p_kernels  # noqa: F401  registers the e8p format's CPU kernel
import casp.nn.aqlm_kernels  # noqa: F401  registers the aqlm format's CPU kernel

MODULE_TYPES = {"lowrank": LowRankLinear, "packed": PackedLinear, "transformed": TransformedLinear}

__all__ = ["LowRankLinear", "MODULE_TYPES", "PackedLinear", "TransformedLinear"]
