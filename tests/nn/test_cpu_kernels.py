"""The scalar format's CPU kernel (torch's int4 matmul, bfloat16 compute) against dequantize-then-matmul.

Tolerance (bfloat16 unit roundoff u = 2^-8), elementwise:
    |y - x·Ŵᵀ - b| ≤ u·|x·Ŵᵀ + b| + u·Σ_k |x_k|·(2|ŵ_nk| + 2^bits·s_nk)
(output rounding; rounding of x, of the scale and of the zero term), see casp.nn.cpu_kernels.
"""
import io

import pytest
import torch
from torch import nn

import casp.nn.cpu_kernels as ck
from casp.nn import PackedLinear
from casp.quant.kernel_registry import using_matmul_kernel
from casp.quant.scalar import QuantSpec, effective_group_size, rtn_codes, to_quantized_weight

U = 2.0 ** -8

pytestmark = pytest.mark.skipif(not ck.kernel_available(), reason="no vectorized bfloat16 int4 path on this CPU")


@pytest.fixture(autouse=True)
def kernel_registered(one_torch_thread):
    """Other tests may unregister the scalar CPU kernel; these need it in place."""
    with using_matmul_kernel("scalar", "cpu", ck.scalar_cpu_matmul):
        yield


def _layer(out_f, in_f, spec, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    qw = to_quantized_weight(*rtn_codes(w, spec), spec, "rtn")
    b = torch.randn(out_f, generator=gen) if bias else None
    return PackedLinear.from_quantized(qw, bias=b)


def _bound(m, x, ref):
    """The elementwise error bound of the module docstring."""
    w = m.dense_weight()
    g = effective_group_size(m.in_features, m.meta["group_size"])
    s = m.scales.float().repeat_interleave(g, dim=1)[:, :m.in_features]
    return U * ref.abs() + U * (x.abs() @ (2 * w.abs() + (1 << m.meta["bits"]) * s).T)


def _reference(m, x):
    return nn.functional.linear(x, m.dense_weight(), m.bias)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(256, 576), (100, 1000)])   # 576: not a multiple of 128; 100, 1000: of 16, 32
def test_matches_dequantized_matmul(shape, bits, group_size, sym):
    m = _layer(*shape, QuantSpec(bits, group_size, sym))
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 16):
        x = torch.randn(tokens, shape[1], generator=gen)
        y = ck.scalar_cpu_matmul(m, x)
        assert y is not None and y.dtype == torch.float32 and y.shape == (tokens, shape[0])
        ref = _reference(m, x)
        assert ((y - ref).abs() <= _bound(m, x, ref)).all()
        assert (y - ref).norm() / ref.norm() < 1e-2
        assert torch.equal(m(x), y)   # PackedLinear.forward dispatches to the kernel


def test_leading_dims_and_no_bias():
    m = _layer(512, 256, QuantSpec(4, 128), bias=False)
    x = torch.randn(2, 3, 256)
    y = m(x)
    assert y.shape == (2, 3, 512) and m.__dict__.get("_kernel_cache") is not None
    ref = _reference(m, x)
    assert ((y - ref).abs() <= _bound(m, x, ref)).all()


def test_zero_codes_and_extreme_zero_points():
    """Codes at 0 and 2^b - 1 with zero points at both ends exercise the code shift's clamping."""
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits, 64)
        w = torch.randn(256, 256)
        w[:128] = w[:128].abs()       # all ≥ 0: zero point 0
        w[128:] = -w[128:].abs()      # all ≤ 0: zero point 2^b - 1
        m = PackedLinear.from_quantized(to_quantized_weight(*rtn_codes(w, spec), spec, "rtn"))
        x = torch.randn(3, 256)
        ref = _reference(m, x)
        assert ((m(x) - ref).abs() <= _bound(m, x, ref)).all()


@pytest.mark.parametrize("case", ["bf16", "fp16", "grad", "tokens", "group50", "group16", "small", "no_simd",
                                  "cache_dequantized"])
def test_declines_to_the_generic_path(case, decline_input):
    spec = QuantSpec(4, {"group50": 50, "group16": 16}.get(case, 128))
    m = _layer(*((64, 64) if case == "small" else (256, 512)), spec)
    x = decline_input(case, m.in_features)
    if case == "cache_dequantized":
        m.cache_dequantized = True
    assert ck.scalar_cpu_matmul(m, x) is None
    y = m(x)
    ref = nn.functional.linear(x, m.dense_weight().to(x.dtype), m.bias.to(x.dtype))
    assert torch.equal(y, ref)
    if case == "grad":
        y.sum().backward()
        assert x.grad is not None


def test_grad_disabled_input_that_requires_grad_uses_the_kernel():
    m = _layer(256, 512, QuantSpec(4, 128))
    x = torch.randn(2, 512, requires_grad=True)
    with torch.no_grad():
        assert ck.scalar_cpu_matmul(m, x) is not None


def test_repack_is_cached_and_invalidated():
    m = _layer(256, 512, QuantSpec(3, 128))
    x = torch.randn(1, 512)
    y = m(x)
    cache = m.__dict__["_kernel_cache"]
    assert torch.equal(m(x), y) and m.__dict__["_kernel_cache"] is cache

    m.clear_cache()
    assert "_kernel_cache" not in m.__dict__
    m(x)
    m.to(torch.device("cpu"))
    assert "_kernel_cache" not in m.__dict__

    other = _layer(256, 512, QuantSpec(3, 128), seed=5)
    m(x)
    m.load_state_dict(other.state_dict())
    assert "_kernel_cache" not in m.__dict__
    assert torch.equal(m(x), other(x))

    with torch.no_grad():
        m.codes.copy_(_layer(256, 512, QuantSpec(3, 128), seed=6).codes)   # in place, behind the hooks' back
    ref = _reference(m, x)
    assert ((m(x) - ref).abs() <= _bound(m, x, ref)).all()


def test_cache_is_not_stored():
    m = _layer(256, 512, QuantSpec(2, 64))
    m(torch.randn(1, 512))
    assert set(m.state_dict()) == {"codes", "scales", "zeros", "bias"}
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = PackedLinear.from_meta(m.meta, has_bias=True)
    loaded.load_state_dict(torch.load(buf))
    x = torch.randn(4, 512)
    assert torch.equal(loaded(x), m(x))


def test_inference_mode_cache_is_usable_outside():
    m = _layer(256, 512, QuantSpec(4, 64))
    x = torch.randn(1, 512)
    with torch.inference_mode():
        y = m(x)
    assert torch.equal(m(x), y)


def test_save_load_round_trip_logits(llama_256_dir, scene_text, tmp_path):
    import casp
    from casp.config import CompressionConfig
    from casp.pipeline import compress

    cfg = CompressionConfig(bits=3.0, calib_samples=4, calib_seq_len=32, seed=0, qk_rank=0,
                            calib_text=str(scene_text))
    res = compress(llama_256_dir, tmp_path / "out", cfg, progress=False)
    ids = torch.randint(5, 40, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = res.model(ids).logits
        loaded = casp.load(tmp_path / "out")
        got = loaded(ids).logits
    used = [m for m in loaded.modules() if isinstance(m, PackedLinear) and m.__dict__.get("_kernel_cache") is not None]
    assert len(used) >= 7          # every decoder linear of the layer ran on the kernel
    assert torch.equal(want, got)
    with torch.no_grad(), using_matmul_kernel("scalar", "cpu", None):
        generic = loaded(ids).logits
    assert (got - generic).norm() / generic.norm() < 1e-2
