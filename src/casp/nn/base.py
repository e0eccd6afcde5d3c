"""`CaspLinear`, the base of casp's inference modules, and the registry that rebuilds them by name.

A module that stores a compressed linear says, whatever its layout:
- `dense_weight()`: the float weight (out × in) it computes with, in the original basis, and
  `dense_bias()`: its output bias or None. Together they are the plain `nn.Linear` it stands for
  (export-dense, the input moments of a factor quantized after its partner, tests).
- `spec()`: the JSON recorded for it in config.json, with its kind under "type";
  `from_spec(spec)`: an empty module of the stored shapes, to load the stored tensors into.
A subclass names its kind in the class statement (`class PackedLinear(CaspLinear, kind="packed")`),
which registers it: loading rebuilds every module through `module_from_spec`, never by class name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

MODULE_TYPES: dict[str, type[CaspLinear]] = {}


class CaspLinear(nn.Module, ABC):
    """A linear stored in compressed form: its dense weight and bias, and the spec that rebuilds it."""

    kind: ClassVar[str]
    # whether one matmul by `dense_weight()` costs no more than the module's own forward (a factored module's
    # children run as dense instead: `casp.nn.decoded`)
    runs_as_dense: ClassVar[bool] = True

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            if kind in MODULE_TYPES:
                raise ValueError(f"casp module kind {kind!r} is already taken by {MODULE_TYPES[kind].__name__}")
            cls.kind = kind
            MODULE_TYPES[kind] = cls

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The float weight (out × in) this module computes with, in the original basis."""

    @abstractmethod
    def dense_bias(self) -> torch.Tensor | None:
        """The bias added to the output (detached), or None."""

    @abstractmethod
    def spec(self) -> dict:
        """What loading needs to rebuild this module before its stored tensors are read (JSON)."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict) -> CaspLinear:
        """An empty module of the shapes `spec` records, to load the stored tensors into."""


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a casp module (`dense_weight()`) or of a plain `nn.Linear` (its `weight`, detached)."""
    return module.dense_weight() if isinstance(module, CaspLinear) else module.weight.detach()


def module_class(kind: str) -> type[CaspLinear]:
    """The registered module class of a spec's "type" (the built-in ones are always known)."""
    if kind not in MODULE_TYPES:
        import casp.nn  # noqa: F401  (the built-in modules register themselves)
    if kind not in MODULE_TYPES:
        raise KeyError(f"unknown casp module type {kind!r}; known: {', '.join(sorted(MODULE_TYPES))}")
    return MODULE_TYPES[kind]


def module_from_spec(spec: dict) -> CaspLinear:
    """An empty module rebuilt from its recorded spec."""
    return module_class(spec.get("type")).from_spec(spec)
