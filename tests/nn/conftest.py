import pytest
import torch


@pytest.fixture(scope="session")
def llama_256_dir(tmp_path_factory):
    """A random Llama whose decoder linears are large enough for the CPU kernels (256x256 and up)."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama256"), hidden=256, intermediate=512, layers=1, kv_heads=4,
                           max_positions=64)


@pytest.fixture
def decline_input(monkeypatch):
    """`make(case, in_features)`: the input of one case a CPU kernel must decline (and the switch it needs)."""
    from casp.nn import cpu_kernels as ck

    def make(case: str, in_features: int) -> torch.Tensor:
        x = torch.randn(ck.MAX_TOKENS + 1 if case == "tokens" else 2, in_features)
        if case == "bf16":
            x = x.bfloat16()
        elif case == "fp16":
            x = x.half()
        elif case == "grad":
            x.requires_grad_(True)
        elif case == "no_simd":
            monkeypatch.setattr(ck, "_fast_cpu", False)
        return x

    return make
