"""Fused matmul kernels of the stored formats, by format name and device type.

A format module declares its kernels where it defines the format:

    declare_kernels("scalar", cpu="casp.nn.cpu_kernels:scalar_cpu_matmul")

A kernel named "module:function" is imported at its first lookup: a format never imports its kernels
(which import the format), and no import has to run first for a kernel to be in place. A lookup of a
format that is not loaded yet loads it (`get_format`), and with it its declarations.

A kernel is `fn(module, x)` returning the output of a `PackedLinear` for input x, or None to decline
(the generic dequantize + `F.linear` path then runs). `register_matmul_kernel` /
`unregister_matmul_kernel` replace or remove one (tests, benchmarks, a CUDA kernel from outside casp);
`using_matmul_kernel` does so for the length of a `with` block.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from casp.quant.base import get_format

MatmulKernel = Callable[[object, torch.Tensor], "torch.Tensor | None"]

_KERNELS: dict[str, dict[str, MatmulKernel | str]] = {}


def declare_kernels(fmt: str, **by_device: MatmulKernel | str) -> None:
    """The kernels of format `fmt` by device type ("cpu", "cuda"): functions or "module:function" names.

    Called by the module that defines the format, as it defines it; it loads nothing.
    """
    _KERNELS.setdefault(fmt, {}).update(by_device)


def _kernels_of(fmt: str) -> dict[str, MatmulKernel | str]:
    """The kernel table of a format, its module loaded first (so that its declarations are in)."""
    if fmt not in _KERNELS:
        get_format(fmt)
    return _KERNELS.setdefault(fmt, {})


def _resolve(name: str) -> MatmulKernel:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def matmul_kernel(fmt: str, device_type: str) -> MatmulKernel | None:
    """The kernel of format `fmt` for inputs on `device_type`, or None if it has none."""
    kernels = _KERNELS.get(fmt)
    if kernels is None:
        kernels = _kernels_of(fmt)
    kernel = kernels.get(device_type)
    if isinstance(kernel, str):
        kernel = kernels[device_type] = _resolve(kernel)
    return kernel


def register_matmul_kernel(fmt: str, device_type: str, fn: MatmulKernel) -> None:
    """Use `fn(module, x)` for layers of format `fmt` on inputs on `device_type`, instead of any declared one."""
    _kernels_of(fmt)[device_type] = fn


def unregister_matmul_kernel(fmt: str, device_type: str) -> None:
    """No kernel for format `fmt` on `device_type`: the generic path runs."""
    _kernels_of(fmt).pop(device_type, None)


@contextmanager
def using_matmul_kernel(fmt: str, device_type: str, fn: MatmulKernel | None) -> Iterator[None]:
    """Within the block, `fn` is the kernel of `fmt` on `device_type` (None: no kernel); then the previous one."""
    before = matmul_kernel(fmt, device_type)
    if fn is None:
        unregister_matmul_kernel(fmt, device_type)
    else:
        register_matmul_kernel(fmt, device_type, fn)
    try:
        yield
    finally:
        if before is None:
            unregister_matmul_kernel(fmt, device_type)
        else:
            register_matmul_kernel(fmt, device_type, before)
