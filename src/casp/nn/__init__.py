"""casp's inference modules, each rebuildable from the JSON spec saved in config.json."""
from casp.nn.lowrank_linear import LowRankLinear
from casp.nn.packed_linear import PackedLinear
from casp.nn.transformed_linear import TransformedLinear

MODULE_TYPES = {"lowrank": LowRankLinear, "packed": PackedLinear, "transformed": TransformedLinear}

__all__ = ["LowRankLinear", "MODULE_TYPES", "PackedLinear", "TransformedLinear"]
