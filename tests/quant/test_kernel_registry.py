"""Kernels are declared with their formats: a lookup finds them in a fresh interpreter whatever was imported
first, importing the kernel module on demand; nothing is installed as a side effect of an import."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import casp
from casp.quant.kernel_registry import (
    declare_kernels, matmul_kernel, register_matmul_kernel, unregister_matmul_kernel, using_matmul_kernel,
)

SRC = str(Path(casp.__file__).resolve().parents[1])
DECLARED = {"scalar": "casp.nn.cpu_kernels.scalar_cpu_matmul",
            "e8p": "casp.nn.e8p_kernels.e8p_fast_cpu_matmul",
            "aqlm": "casp.nn.aqlm_kernels.aqlm_fast_cpu_matmul"}
FORMAT_MODULES = {"scalar": "casp.quant.scalar", "e8p": "casp.quant.e8", "aqlm": "casp.quant.aqlm"}


def _fresh(code: str) -> str:
    """stdout of `code` run by a new interpreter on this checkout."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _lookup(first_import: str, fmt: str) -> str:
    return (f"import sys, {first_import}\n"
            f"kernel_module = {DECLARED[fmt].rsplit('.', 1)[0]!r}\n"
            "loaded_before = kernel_module in sys.modules\n"
            "from casp.quant.kernel_registry import matmul_kernel\n"
            f"k = matmul_kernel({fmt!r}, 'cpu')\n"
            "print(loaded_before, k.__module__ + '.' + k.__name__)")


@pytest.mark.parametrize("fmt", sorted(DECLARED))
def test_lookup_after_importing_only_the_format_module(fmt):
    """The format module alone: its kernel module is not loaded until the lookup, which finds it."""
    assert _fresh(_lookup(FORMAT_MODULES[fmt], fmt)) == f"False {DECLARED[fmt]}"


@pytest.mark.parametrize("fmt", sorted(DECLARED))
def test_lookup_after_importing_only_the_kernel_module(fmt):
    """The kernel module first (it imports its format): the same kernel, nothing registered twice."""
    assert _fresh(_lookup(DECLARED[fmt].rsplit(".", 1)[0], fmt)) == f"True {DECLARED[fmt]}"


def test_lookup_loads_the_format_and_a_packed_layer_runs_its_kernel():
    """Only the registry imported: the lookup loads the format; importing casp.nn installs nothing."""
    code = ("import sys\n"
            "from casp.quant.kernel_registry import matmul_kernel\n"
            "print(matmul_kernel('aqlm', 'cpu').__name__)\n"
            "import casp.nn\n"
            "print(sorted(m for m in sys.modules if m.endswith('_kernels')))")
    assert _fresh(code).splitlines() == ["aqlm_fast_cpu_matmul", "['casp.nn.aqlm_kernels', 'casp.nn.cpu_kernels']"]


def test_register_replace_and_restore():
    calls = []

    def kernel(module, x):
        calls.append(x.shape)

    declared = matmul_kernel("scalar", "cpu")
    with using_matmul_kernel("scalar", "cpu", kernel):
        assert matmul_kernel("scalar", "cpu") is kernel
        with using_matmul_kernel("scalar", "cpu", None):
            assert matmul_kernel("scalar", "cpu") is None
        assert matmul_kernel("scalar", "cpu") is kernel
    assert matmul_kernel("scalar", "cpu") is declared
    assert matmul_kernel("scalar", "cuda") is None
    register_matmul_kernel("scalar", "cuda", kernel)
    try:
        assert matmul_kernel("scalar", "cuda") is kernel
    finally:
        unregister_matmul_kernel("scalar", "cuda")
    assert matmul_kernel("scalar", "cuda") is None


def test_declared_by_name_or_function_and_unknown_format():
    def kernel(module, x):
        return torch.zeros(1)

    declare_kernels("test-declared", cpu=kernel, cuda="casp.nn.cpu_kernels:scalar_cpu_matmul")
    assert matmul_kernel("test-declared", "cpu") is kernel
    assert matmul_kernel("test-declared", "cuda").__name__ == "scalar_cpu_matmul"
    with pytest.raises(KeyError, match="unknown storage format 'no-such-format'"):
        matmul_kernel("no-such-format", "cpu")
