"""The vector formats' CPU kernels against dequantize-then-matmul, on matrices from the real quantizers.

Tolerances (elementwise; Ŵ the float32 dequantized weight, y_ref = x·Ŵᵀ without bias):
- e8p (int4 kernel, bfloat16 inputs, u = 2^-8, stage weights Ŵ_k = s_k·V_k):
      |y - y_ref - b| ≤ u·|y_ref| + (2u + 3·in·2^-24)·Σ_i |x_i|·Σ_k |Ŵ_k[n, i]|
- aqlm (float32 lookup tables, u = 2^-24, G groups of g, M codebooks):
      |y - y_ref - b| ≤ (G·(g + M) + g + 4)·u·|s_n|·Σ_i |x_i|·Σ_m |C_m[b_{n,i,m}]_i|
(see casp.nn.e8p_kernels and casp.nn.aqlm_kernels).
"""
import io

import pytest
import torch
from torch import nn

import casp.nn.aqlm_kernels as ak
import casp.nn.cpu_kernels as ck
from casp.algorithms.additive import reconstruct
from casp.nn import PackedLinear
from casp.nn.aqlm_kernels import aqlm_fast_cpu_matmul
from casp.nn.e8p_kernels import e8p_fast_cpu_matmul, stage_codes, stage_zeros
from casp.quant import QuantizedWeight
from casp.quant import aqlm as aqlm_mod
from casp.quant import e8 as e8mod
from casp.quant.aqlm import AQLMQuantizer, AQLMSetting, unpack_aqlm_codes
from casp.quant.e8 import E8Quantizer, E8Setting
from casp.quant.kernel_registry import using_matmul_kernel
from random_problems import weight_and_xtx

U_BF16 = 2.0 ** -8
U_F32 = 2.0 ** -24
KERNELS = {"e8p": e8p_fast_cpu_matmul, "aqlm": aqlm_fast_cpu_matmul}

pytestmark = pytest.mark.skipif(not ck.kernel_available(), reason="no vectorized bfloat16 int4 path on this CPU")


@pytest.fixture(autouse=True)
def kernels_registered(one_torch_thread):
    """Other tests may unregister the CPU kernels; these need them in place."""
    with using_matmul_kernel("e8p", "cpu", KERNELS["e8p"]), using_matmul_kernel("aqlm", "cpu", KERNELS["aqlm"]):
        yield


def _e8_layer(bits, act_order=False, in_f=512, out_f=256, seed=0, bias=True):
    w, h = weight_and_xtx(out_f, in_f, seed=seed)
    qw, deq = E8Quantizer(scale_multipliers=(1.0,)).quantize(w, h, E8Setting(bits, act_order))
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed)) if bias else None
    return PackedLinear.from_quantized(qw, bias=b), deq


def _aqlm_layer(setting, in_f=512, out_f=256, seed=0, bias=True):
    w, h = weight_and_xtx(out_f, in_f, seed=seed)
    bits = next(b for b in range(1, 33) if b * setting.group_size % setting.codebook_bits == 0)
    q = AQLMQuantizer(rounds=1, kmeans_iters=2, beam=1, codebook_bits=setting.codebook_bits,
                      group_size=setting.group_size, candidate_bits=(bits,))
    qw, deq = q.quantize(w, h, setting)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed)) if bias else None
    return PackedLinear.from_quantized(qw, bias=b), deq


def _e8_bound(m, x, y_ref):
    stages = sum((s * ((q.float() - 8) * 0.5 + z)).abs()
                 for q, s, z in zip(stage_codes(m, 0, m.out_features), m.scales.float(), stage_zeros(m)))
    return U_BF16 * y_ref.abs() + (2 * U_BF16 + 3 * m.in_features * U_F32) * (x.abs() @ stages.T)


def _aqlm_bound(m, x):
    meta = m.meta
    g, books = meta["group_size"], m.codebooks.float().abs()
    codes = unpack_aqlm_codes(m.codes, meta)
    groups, m_count = codes.shape[1:]
    w_abs = m.scales.float().abs()[:, None] * reconstruct(codes, books)[:, :m.in_features]
    return (groups * (g + m_count) + g + 4) * U_F32 * (x.abs() @ w_abs.T)


def _check(m, deq, x, bound):
    y_ref = nn.functional.linear(x, deq)
    ref = y_ref if m.bias is None else y_ref + m.bias
    y = KERNELS[m.meta["format"]](m, x)
    assert m.__dict__.get("_kernel_cache") is not None       # the fast path ran, not the fallback
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y - ref).abs() <= bound(y_ref)).all()
    assert torch.equal(m(x), y)                                 # PackedLinear.forward dispatches to it
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("act_order,in_f", [(False, 512), (True, 512), (False, 300), (True, 300)])
def test_e8p_matches_dequantized_matmul(bits, act_order, in_f):
    """300 inputs: padded to 304 (codes) and 320 (kernel); with act order the permutation is baked in."""
    m, deq = _e8_layer(bits, act_order, in_f, bias=bits != 3)
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 16):
        x = torch.randn(tokens, in_f, generator=gen)
        rel = _check(m, deq, x, lambda y_ref: _e8_bound(m, x, y_ref))
        assert rel < 5e-3


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, True), (4, True), (5, False), (6, True)])
def test_e8p_stage_values_are_the_stored_codewords(bits, act_order):
    """Σ_k s_k·((q_k - 8)·½ + zero_k) is `dequantize_e8p` bit for bit: only x and y are rounded."""
    m, deq = _e8_layer(bits, act_order, in_f=300)
    qs = stage_codes(m, 0, m.out_features)
    rebuilt = sum(float(s) * ((q.float() - 8) * 0.5 + z) for q, s, z in zip(qs, m.scales.float(), stage_zeros(m)))
    assert torch.equal(rebuilt, deq)
    assert all(int(q.min()) >= 0 and int(q.max()) < 16 for q in qs)


@pytest.mark.parametrize("setting,in_f", [(AQLMSetting(2, 8, 8), 512), (AQLMSetting(3, 8, 8), 300),
                                          (AQLMSetting(2, 6, 8), 300), (AQLMSetting(1, 8, 4), 512)])
@pytest.mark.parametrize("one_call_bytes", [ak.ONE_CALL_BYTES, 0])
def test_aqlm_matches_dequantized_matmul(setting, in_f, one_call_bytes, monkeypatch):
    """2x8 / 3x8 (uint8 codes), 2x6 (packed codes), 1x8 with groups of 4; 300 inputs padded to 304 (and
    to 3 chunks of 16 groups); all tables in one call, or one chunk at a time."""
    monkeypatch.setattr(ak, "ONE_CALL_BYTES", one_call_bytes)
    m, deq = _aqlm_layer(setting, in_f, bias=in_f == 512)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, in_f), (16, in_f), (2, 3, in_f)]:
        x = torch.randn(shape, generator=gen)
        rel = _check(m, deq, x, lambda y_ref: _aqlm_bound(m, x))
        assert rel < 1e-5


def _random_aqlm(out_f, in_f, codebook_bits):
    """An "aqlm" layer with random codes (for the paths whose values do not matter)."""
    m_count, g = 1, 8
    meta = {"format": "aqlm", "method": "aqlm", "bits": m_count * codebook_bits / g, "num_codebooks": m_count,
            "codebook_bits": codebook_bits, "group_size": g, "out_features": out_f, "in_features": in_f}
    codes = torch.randint(-(1 << 15), 1 << 15, (out_f, in_f // g, m_count), dtype=torch.int16)
    tensors = {"codes": codes, "codebooks": torch.randn(m_count, 1 << codebook_bits, g).half(),
               "scales": torch.rand(out_f).half()}
    return PackedLinear.from_quantized(QuantizedWeight(tensors, meta), bias=torch.randn(out_f))


@pytest.mark.parametrize("fmt", ["e8p", "aqlm"])
@pytest.mark.parametrize("case", ["bf16", "grad", "tokens", "small", "no_simd"])
def test_declines_to_the_formats_slab_kernel(fmt, case, decline_input):
    in_f = 64 if case == "small" else 512
    m, deq = _e8_layer(3, True, in_f) if fmt == "e8p" else _aqlm_layer(AQLMSetting(2, 8, 8), in_f)
    x = decline_input(case, in_f)
    slab = e8mod.e8p_cpu_matmul if fmt == "e8p" else aqlm_mod.aqlm_cpu_matmul
    y = KERNELS[fmt](m, x)
    assert torch.equal(y, slab(m, x)) and m.__dict__.get("_kernel_cache") is None
    ref = nn.functional.linear(x.float(), deq, m.bias)
    assert (y.float() - ref).norm() / ref.norm() < (1e-2 if case == "bf16" else 1e-5)
    if case == "grad":
        y.sum().backward()
        assert x.grad is not None


def test_aqlm_large_codebooks_decline():
    """2^16-entry codebooks (AQLM's 1x16): tables would outgrow the layer, so slabs run."""
    m = _random_aqlm(256, 512, 16)
    x = torch.randn(1, 512)
    y = aqlm_fast_cpu_matmul(m, x)
    assert m.__dict__.get("_kernel_cache") is None
    ref = nn.functional.linear(x, m.dense_weight(), m.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["e8p", "aqlm"])
def test_cache_dequantized_takes_the_generic_path(fmt):
    m, deq = _e8_layer(2) if fmt == "e8p" else _aqlm_layer(AQLMSetting(2, 8, 8))
    m.cache_dequantized = True
    x = torch.randn(2, 512)
    assert KERNELS[fmt](m, x) is None
    assert torch.equal(m(x), nn.functional.linear(x, deq, m.bias))


@pytest.mark.parametrize("fmt", ["e8p", "aqlm"])
def test_cache_is_dropped_on_move_and_load_and_not_stored(fmt):
    def layer(seed):
        return (_e8_layer(4, True, seed=seed) if fmt == "e8p" else _aqlm_layer(AQLMSetting(2, 8, 8), seed=seed))[0]

    m, other = layer(0), layer(5)
    x = torch.randn(1, 512)
    y = m(x)
    cache = m.__dict__["_kernel_cache"]
    assert torch.equal(m(x), y) and m.__dict__["_kernel_cache"] is cache
    m.to(torch.device("cpu"))
    assert "_kernel_cache" not in m.__dict__
    m(x)
    m.load_state_dict(other.state_dict())
    assert "_kernel_cache" not in m.__dict__
    assert torch.equal(m(x), other(x))
    assert set(m.state_dict()) == set(m._tensor_names) | {"bias"}
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = PackedLinear.from_meta(m.meta, has_bias=True)
    loaded.load_state_dict(torch.load(buf))
    assert torch.equal(loaded(x), m(x))


@pytest.mark.parametrize("quantizer,options,bits", [
    ("e8", {"scale_multipliers": (1.0,), "act_order": True}, 3.0),
    ("aqlm", {"rounds": 1, "kmeans_iters": 2, "beam": 1}, 2.0),
])
def test_saved_and_reloaded_model_gives_the_same_logits(llama_256_dir, scene_text, tmp_path, quantizer, options, bits):
    import casp
    from casp.config import CompressionConfig
    from casp.pipeline import compress

    cfg = CompressionConfig(quantizer=quantizer, quantizer_options=options, bits=bits, allocation="uniform",
                            calib_samples=4, calib_seq_len=32, seed=0, qk_rank=0, calib_text=str(scene_text))
    res = compress(llama_256_dir, tmp_path / "out", cfg, progress=False)
    ids = torch.randint(5, 40, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = res.model(ids).logits
        loaded = casp.load(tmp_path / "out")
        got = loaded(ids).logits
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 7 and all(m.__dict__.get("_kernel_cache") is not None for m in packed)
    assert torch.equal(want, got)


@pytest.mark.parametrize("fmt", ["e8p", "aqlm"])
def test_inference_mode_cache_is_usable_outside(fmt):
    m, _ = _e8_layer(3) if fmt == "e8p" else _aqlm_layer(AQLMSetting(2, 8, 8))
    x = torch.randn(2, 512)
    with torch.inference_mode():
        y = m(x)
    assert m.__dict__.get("_kernel_cache") is not None and torch.equal(m(x), y)
