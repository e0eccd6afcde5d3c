"""The e8 quantizer: settings, the "e8p" stored format (exact bits, round trip, CPU kernel) and a tiny
model compressed with it, saved and reloaded by `from_pretrained` with identical logits."""
import pytest
import torch

import casp
from casp.config import CompressionConfig
from casp.recipe import resolve
from casp.errors import CaspError
from casp.nn.e8p_kernels import e8p_fast_cpu_matmul
from casp.nn.packed_linear import PackedLinear
from casp.quant import GPTQ, QuantSpec, get_format, get_quantizer_class, quant_loss
from casp.quant import e8 as e8mod
from casp.quant.e8 import E8Quantizer, E8Setting
from casp.quant.kernel_registry import matmul_kernel
from random_problems import weight_and_xtx


pytestmark = pytest.mark.usefixtures("one_torch_thread")


problem = weight_and_xtx


def fast(**options) -> E8Quantizer:
    return E8Quantizer(scale_multipliers=(1.0, 1.1), **options)


def test_registered_with_settings():
    q = get_quantizer_class("e8")()
    assert [s.label() for s in q.candidates()] == ["e8p-2b", "e8p-3b", "e8p-4b"]
    assert q.uniform_setting(3.0) == E8Setting(3)
    assert E8Setting(4, True).describe() == {"bits": 4, "act_order": True}
    with pytest.raises(ValueError, match="2 to 6 bits"):
        q.uniform_setting(2.5)
    with pytest.raises(ValueError, match="among 2 to 6"):
        E8Quantizer(candidate_bits=(2, 8))
    with pytest.raises(ValueError, match="rvq5-scales must be 3"):
        E8Quantizer(rvq5_scales=(0.9, 3.85))


@pytest.mark.parametrize("bits,ladder", [(2.0, (2, 3, 4)), (2.9, (2, 3, 4)), (3.25, (2, 3, 4, 5)), (4.25, (2, 3, 4, 5, 6)),
                                         (7.0, (2, 3, 4, 5, 6))])
def test_default_ladder_reaches_past_the_target(bits, ladder):
    """Without --candidate-bits the rungs go to ⌊target⌋ + 2 (4 to 6), so a 4.25-bit target can be spent;
    the user's own ladder wins."""
    assert resolve(CompressionConfig(bits=bits, quantizer="e8"), None).build_quantizer().config.candidate_bits == ladder
    q = resolve(CompressionConfig(bits=bits, quantizer="e8", quantizer_options={"candidate_bits": (2, 3)}), None).build_quantizer()
    assert q.config.candidate_bits == (2, 3)


def test_cli_flags_reach_the_config():
    from casp.cli import _quantizer_options, build_parser

    args = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "e8", "--e8-damp", "0.05",
                                      "--e8-scale-grid", "1,1.1", "--e8-rvq4-scales", "1.03,3.45", "--e8-act-order",
                                      "--candidate-bits", "2,4"])
    q = resolve(CompressionConfig(quantizer="e8", quantizer_options=_quantizer_options(args)), None).build_quantizer()
    c = q.config
    assert (c.ldlq_damp, c.scale_multipliers, c.rvq4_scales, c.act_order, c.candidate_bits) == \
        (0.05, (1.0, 1.1), (1.03, 3.45), True, (2, 4))
    with pytest.raises(CaspError, match="no option sym"):
        resolve(CompressionConfig(quantizer="e8", quantizer_options={"sym": True}), None).build_quantizer()


@pytest.mark.parametrize("shape", [(16, 64), (24, 20), (8, 130)])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("act_order", [False, True])
def test_stored_bits_are_exact_and_tensors_round_trip(shape, bits, act_order):
    w, h = problem(*shape, seed=bits)
    q = fast(act_order=act_order)
    s = E8Setting(bits, act_order)
    qw, deq = q.quantize(w, h, s)
    assert qw.stored_bits() == q.stored_bits(s, *shape)
    groups = -(-shape[1] // 8)
    stages = {2: 1, 3: 2, 4: 2, 5: 3, 6: 3}[bits]
    assert qw.stored_bits() == shape[0] * groups * (bits * 8) + 16 * stages + act_order * 16 * shape[1]
    empty = get_format("e8p").empty_tensors(qw.meta)
    assert {k: (v.dtype, v.shape) for k, v in empty.items()} == {k: (v.dtype, v.shape) for k, v in qw.tensors.items()}
    assert deq.shape == shape and deq.dtype == torch.float32
    assert torch.equal(qw.dequantize(), deq)
    loaded = type(qw)({k: empty[k].copy_(v) for k, v in qw.tensors.items()}, dict(qw.meta))
    assert torch.equal(loaded.dequantize(), deq)
    read = get_format("e8p").rows(qw)
    assert torch.equal(torch.cat([read(0, 5), read(5, shape[0])]), deq)


def test_dequantized_weight_is_the_quantizers_choice():
    from casp.algorithms.e8p import quantize_matrix

    w, h = problem(16, 48)
    qw, deq = fast().quantize(w, h, E8Setting(4))
    r = quantize_matrix(w, h, 4, rho=0.9, resid_scale=3.85, multipliers=(1.0, 1.1))
    torch.testing.assert_close(deq, r.weight, rtol=0, atol=1e-6)
    assert quant_loss(w, deq, h) == pytest.approx(r.loss, rel=1e-5)


@pytest.mark.parametrize("bits,act_order,in_f", [(2, False, 64), (3, True, 36), (4, False, 20), (5, True, 36),
                                                  (6, False, 20)])
def test_cpu_kernel_matches_dequantize_then_matmul(bits, act_order, in_f, monkeypatch):
    """Tolerance: 1e-5 relative to the output scale (float32 sums in a different order)."""
    w, h = problem(40, in_f, seed=1)
    qw, deq = fast(act_order=act_order).quantize(w, h, E8Setting(bits, act_order))
    bias = torch.randn(40)
    module = PackedLinear.from_quantized(qw, bias)
    x = torch.randn(2, 3, in_f)
    ref = torch.nn.functional.linear(x, deq, bias)
    monkeypatch.setattr(e8mod, "_CPU_SLAB_ELEMENTS", 8 * in_f)  # several slabs of rows
    y = e8mod.e8p_cpu_matmul(module, x)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert matmul_kernel("e8p", "cpu") is e8p_fast_cpu_matmul   # declines small layers to the slab kernel
    torch.testing.assert_close(module(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_two_bits_beat_gptq_two_bits_g128():
    w, h = problem(64, 256, seed=4)
    _, e8 = E8Quantizer().quantize(w, h, E8Setting(2))
    _, gptq = GPTQ().quantize(w, h, QuantSpec(2, 128))
    assert quant_loss(w, e8, h) < quant_loss(w, gptq, h)


def test_quantizes_without_xtx():
    w, _ = problem(8, 24)
    qw, deq = fast().quantize(w, None, E8Setting(2))
    assert deq.shape == (8, 24) and float((deq - w).pow(2).mean()) < float(w.pow(2).mean())


def _compress_and_reload(tiny_llama_dir, scene_text, out, **kw):
    from transformers import AutoModelForCausalLM

    cfg = CompressionConfig(quantizer="e8", quantizer_options={"scale_multipliers": (1.0, 1.1)}, calib_samples=8,
                            calib_seq_len=32, calib_text=str(scene_text), **kw)
    res = casp.compress(tiny_llama_dir, out, cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.meta["format"] == "e8p" for m in packed)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)
    return res


@pytest.mark.parametrize("bits", [2.0, 3.0, 5.0])
def test_uniform_compression_reloads_with_identical_logits(tiny_llama_dir, scene_text, tmp_path, bits):
    res = _compress_and_reload(tiny_llama_dir, scene_text, tmp_path / "out", bits=bits, allocation="uniform", qk_rank=0)
    assert {row["setting"] for row in res.report["layers"]} == {f"e8p-{int(bits)}b"}
    assert bits <= res.report["average_bits"] < bits + 0.01


def test_rd_allocation_with_lowrank_factors(tiny_llama_dir, scene_text, tmp_path):
    """qk_rank 0.25 gives W_k factors of rank 10: the up factor's 10 inputs are padded to 16."""
    res = _compress_and_reload(tiny_llama_dir, scene_text, tmp_path / "out", bits=3.0, qk_rank=0.25)
    rows = res.report["layers"]
    q = E8Quantizer()
    for row in rows:
        s = E8Setting(row["bits"], row["act_order"])
        assert row["stored_bits"] == q.stored_bits(s, row["out_features"], row["in_features"])
    assert 10 in {row["in_features"] for row in rows}
    assert res.report["average_bits"] <= 3.0


def test_e8_shrink_one_rounds_as_if_xtx_were_diagonal():
    """--e8-shrink 1 keeps only XᵀX's diagonal for BlockLDLQ; 0 is the default; out of [0, 1] is refused."""
    w, h = problem(16, 64, seed=3)
    q = E8Quantizer(scale_multipliers=(1.0,), shrink=1.0)
    ref = E8Quantizer(scale_multipliers=(1.0,))
    assert torch.equal(q.quantize(w, h, E8Setting(2))[1], ref.quantize(w, torch.diag(h.diagonal()), E8Setting(2))[1])
    assert not torch.equal(q.quantize(w, h, E8Setting(2))[1], ref.quantize(w, h, E8Setting(2))[1])
    with pytest.raises(ValueError, match="e8-shrink"):
        E8Quantizer(shrink=-0.1)


def test_a_large_matrix_takes_its_scale_from_a_row_sample_then_is_coded_once(monkeypatch):
    """Past twice `scale_sample_rows` rows, the multiplier is chosen on a row sample and the whole matrix is
    coded once with it; `scale_sample_rows=0` tries every multiplier on every row."""
    import casp.algorithms.e8p as alg
    from casp.algorithms.e8p import quantize_matrix

    w, h = problem(40, 24, seed=3)
    q = E8Quantizer(scale_multipliers=(0.8, 1.0, 1.25), scale_sample_rows=8)
    swept = []
    real = alg.block_ldlq
    monkeypatch.setattr(alg, "block_ldlq", lambda w_, *a, **k: swept.append(w_.shape[0]) or real(w_, *a, **k))
    qw, deq = q.quantize(w, h, E8Setting(3))
    assert swept == [8 * 3, 40]
    mult = q._scale_choice(w, h, E8Setting(3))
    assert len(mult) == 1 and mult[0] in (0.8, 1.0, 1.25)
    one = quantize_matrix(w, h, 3, rho=0.98, resid_scale=(2.04,), multipliers=mult)
    torch.testing.assert_close(deq, one.weight, rtol=0, atol=1e-6)
    swept.clear()
    E8Quantizer(scale_multipliers=(0.8, 1.0, 1.25), scale_sample_rows=0).quantize(w, h, E8Setting(3))
    assert swept == [40 * 3]


def test_a_sweep_hints_the_multiplier_that_won_and_a_hinted_matrix_is_coded_once_with_it(monkeypatch):
    """`sweep` returns, per setting, the multiplier of lowest proxy loss; `quantize_hinted` codes the matrix once at
    that multiplier, with no scale search of its own (what the layer pass does with the plan's hints)."""
    import casp.algorithms.e8p as alg
    from casp.algorithms.e8p import quantize_candidates, StageSpec

    w, h = problem(40, 24, seed=5)
    q = E8Quantizer(scale_multipliers=(0.8, 1.0, 1.25), scale_sample_rows=8)
    settings = [E8Setting(2), E8Setting(3)]
    swept = q.sweep(w, h, settings)
    for s, (deq, hint) in zip(settings, swept):
        rho, resid = q.config.rho_and_resid(s.bits)
        best = quantize_candidates(w, h, [StageSpec(s.bits, rho, resid)], multipliers=(0.8, 1.0, 1.25))[0]
        assert hint == {"multiplier": best.multiplier}
        torch.testing.assert_close(deq, best.weight, rtol=0, atol=0)
    sizes = []
    real = alg.block_ldlq
    monkeypatch.setattr(alg, "block_ldlq", lambda w_, *a, **k: sizes.append(w_.shape[0]) or real(w_, *a, **k))
    hint = {"multiplier": 1.25}
    qw, deq = q.quantize_hinted(w, h, E8Setting(3), hint)
    assert sizes == [40]
    one = alg.quantize_matrix(w, h, 3, rho=0.98, resid_scale=(2.04,), multipliers=(1.25,))
    torch.testing.assert_close(deq, one.weight, rtol=0, atol=1e-6)
    sizes.clear()
    q.quantize_hinted(w, h, E8Setting(3), None)
    assert sizes == [8 * 3, 40]
