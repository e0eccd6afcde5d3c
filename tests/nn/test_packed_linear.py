import io

import pytest
import torch
from torch import nn

from casp.nn.packed_linear import PackedLinear
from casp.quant.kernel_registry import register_matmul_kernel, unregister_matmul_kernel
from casp.quant.scalar import scalar_stored_bits as storage_bits
from casp.quant import QuantizedWeight, QuantSpec, get_quantizer_class, register_format, StorageFormat


def _quantized(out_f=48, in_f=200, spec=QuantSpec(3, 64), method="rtn"):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    x = torch.randn(256, in_f)
    xtx = x.T @ x
    qw, deq = get_quantizer_class(method)().quantize(lin.weight.data, xtx, spec)
    return lin, qw, deq


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("spec", [QuantSpec(2, 128), QuantSpec(3, 64, True), QuantSpec(4, -1), QuantSpec(8, 50)])
def test_forward_matches_dequantized_linear(method, spec):
    lin, qw, deq = _quantized(spec=spec, method=method)
    m = PackedLinear.from_quantized(qw, bias=lin.bias.data)
    assert (m.in_features, m.out_features) == (200, 48)
    assert torch.equal(m.dense_weight(), deq)
    x = torch.randn(5, 7, 200)
    assert torch.equal(m(x), nn.functional.linear(x, deq, lin.bias.data))
    assert m.stored_bits() == qw.stored_bits() == storage_bits(spec, 48, 200)
    assert not hasattr(m, "weight")
    assert set(dict(m.named_buffers())) == set(qw.tensors)


def test_runs_in_input_dtype():
    lin, qw, deq = _quantized()
    m = PackedLinear.from_quantized(qw, bias=lin.bias.data)
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.linear(x, deq.bfloat16(), lin.bias.data.bfloat16())
    assert torch.equal(y, ref)


def test_state_dict_round_trip_through_from_meta():
    lin, qw, _ = _quantized(spec=QuantSpec(2, 100))
    m = PackedLinear.from_quantized(qw, bias=lin.bias.data.half())
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = PackedLinear.from_meta(m.meta, has_bias=True, dtype=torch.float16)
    loaded.load_state_dict(torch.load(buf))
    assert loaded.bias.dtype == torch.float16
    x = torch.randn(4, 200)
    assert torch.equal(loaded(x), m(x))
    empty = PackedLinear.from_meta(m.meta, has_bias=False)
    assert empty.bias is None and empty.stored_bits() == m.stored_bits()


def test_cache_dequantized():
    lin, qw, deq = _quantized()
    m = PackedLinear.from_quantized(qw, cache_dequantized=True)
    x = torch.randn(2, 200)
    y1 = m(x)
    assert m._cache is not None and torch.equal(m._cache, deq)
    assert torch.equal(m(x), y1)
    m.to(torch.device("cpu"))
    assert m._cache is None
    _, big_qw, _ = _quantized(out_f=300, in_f=256)
    big = PackedLinear.from_quantized(big_qw)
    big(torch.randn(2, 256))
    assert big._cache is None


def test_small_layers_cache_their_weight_and_follow_in_place_changes():
    """Under SMALL_WEIGHTS the dense weight is kept; changing a stored buffer in place rebuilds it."""
    lin, qw, deq = _quantized()
    m = PackedLinear.from_quantized(qw)
    x = torch.randn(2, 200)
    assert torch.equal(m(x), nn.functional.linear(x, deq)) and torch.equal(m._cache, deq)
    m.scales.mul_(2)
    assert torch.equal(m(x), nn.functional.linear(x, m.dense_weight()))
    assert torch.equal(m._cache, m.dense_weight()) and not torch.equal(m._cache, deq)


def test_kernel_extension_point():
    lin, qw, deq = _quantized()
    m = PackedLinear.from_quantized(qw)
    calls = []

    def kernel(module, x):
        calls.append(x.shape)
        return None if x.shape[0] > 1 else torch.zeros(1, module.out_features)

    register_matmul_kernel("scalar", "cpu", kernel)
    try:
        assert torch.equal(m(torch.ones(1, 200)), torch.zeros(1, 48))
        assert torch.equal(m(torch.ones(2, 200)), nn.functional.linear(torch.ones(2, 200), deq))
    finally:
        unregister_matmul_kernel("scalar", "cpu")
    assert len(calls) == 2


def test_any_registered_format():
    # a toy format: the weight stored as fp16
    register_format(StorageFormat(
        "fp16-test",
        dequantize=lambda qw: qw.tensors["w"].float(),
        empty_tensors=lambda meta: {"w": torch.zeros(meta["out_features"], meta["in_features"], dtype=torch.float16)},
        stored_bits=lambda setting, out_features, in_features: 16 * out_features * in_features,
    ))
    w = torch.randn(6, 10)
    qw = QuantizedWeight({"w": w.half()}, {"format": "fp16-test", "out_features": 6, "in_features": 10})
    m = PackedLinear.from_quantized(qw)
    assert torch.equal(m(torch.eye(10)), w.half().float().T)
    assert m.stored_bits() == 6 * 10 * 16
    assert PackedLinear.from_meta(qw.meta).w.shape == (6, 10)


def test_repr_mentions_format():
    _, qw, _ = _quantized()
    assert "format=scalar" in repr(PackedLinear.from_quantized(qw))


@pytest.mark.parametrize("chunk_rows", [1, 7, 32])
def test_slabbed_forward(chunk_rows):
    lin, qw, deq = _quantized(out_f=70, in_f=100, spec=QuantSpec(3, 32))
    m = PackedLinear.from_quantized(qw, bias=lin.bias.data, chunk_rows=chunk_rows)
    x = torch.randn(3, 4, 100)
    y = m(x)
    assert y.shape == (3, 4, 70)
    torch.testing.assert_close(y, nn.functional.linear(x, deq, lin.bias.data), rtol=1e-5, atol=1e-5)
    assert torch.equal(m.dense_weight(), deq)


def test_dtype_casts_keep_the_stored_tensors():
    lin, qw, deq = _quantized()
    m = PackedLinear.from_quantized(qw, bias=lin.bias.data)
    before = {n: b.clone() for n, b in m.named_buffers()}
    m.to(torch.bfloat16)
    m.float()
    for n, b in m.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n])
    assert m.bias.dtype == torch.float32
    assert torch.equal(m.dense_weight(), deq)
