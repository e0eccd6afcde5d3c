"""The aqlm quantizer: settings, the "aqlm" stored format (exact bits, packed codes, row reader, CPU kernel)
and a tiny model compressed with it, saved and reloaded by `from_pretrained` with identical logits."""
import pytest
import torch

import casp
from casp.config import CompressionConfig
from casp.recipe import resolve
from casp.errors import CaspError
from casp.nn.aqlm_kernels import aqlm_fast_cpu_matmul
from casp.nn.packed_linear import PackedLinear
from casp.quant import get_format, get_quantizer_class, quant_loss
from casp.quant import aqlm as aqlm_mod
from casp.quant.aqlm import AQLMQuantizer, AQLMSetting, pack_aqlm_codes, unpack_aqlm_codes
from casp.quant.kernel_registry import matmul_kernel
from random_problems import weight_and_xtx


pytestmark = pytest.mark.usefixtures("one_torch_thread")


problem = weight_and_xtx


def fast(setting: AQLMSetting | None = None, **options) -> AQLMQuantizer:
    """A quick quantizer whose codebook size and group fit `setting` (its candidate bits made valid)."""
    if setting is not None:
        bits = next(b for b in range(1, 33) if b * setting.group_size % setting.codebook_bits == 0)
        options.update(codebook_bits=setting.codebook_bits, group_size=setting.group_size, candidate_bits=(bits,))
    return AQLMQuantizer(rounds=1, kmeans_iters=2, **options)


def test_registered_with_settings():
    q = get_quantizer_class("aqlm")()
    assert [s.label() for s in q.candidates()] == ["aqlm-2x8g8", "aqlm-3x8g8", "aqlm-4x8g8"]
    assert q.uniform_setting(3.0) == AQLMSetting(3, 8, 8)
    assert AQLMSetting(2, 8, 8).describe() == {"bits": 2, "num_codebooks": 2, "codebook_bits": 8, "group_size": 8}
    assert AQLMSetting(1, 12, 8).describe()["bits"] == 1.5
    assert AQLMQuantizer(codebook_bits=16).uniform_setting(2) == AQLMSetting(1, 16, 8)   # AQLM's 1x16
    with pytest.raises(ValueError, match="not a positive integer"):
        q.uniform_setting(2.5)
    assert [s.label() for s in AQLMQuantizer(codebook_bits=16).candidates()] == ["aqlm-1x16g8", "aqlm-2x16g8"]
    with pytest.raises(ValueError, match="none of the candidate"):
        AQLMQuantizer(codebook_bits=16, candidate_bits=(3,))
    with pytest.raises(ValueError, match="1..16"):
        AQLMQuantizer(codebook_bits=17, candidate_bits=(4,))


def test_cli_flags_reach_the_config():
    from casp.cli import _quantizer_options, build_parser

    args = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "aqlm", "--aqlm-codebook-bits", "4",
                                      "--aqlm-group", "4", "--aqlm-beam", "3", "--aqlm-rounds", "2",
                                      "--aqlm-finetune-steps", "10", "--candidate-bits", "2,3"])
    c = resolve(CompressionConfig(quantizer="aqlm", quantizer_options=_quantizer_options(args)), None).build_quantizer().config
    assert (c.codebook_bits, c.group_size, c.beam, c.rounds, c.finetune_steps, c.candidate_bits) == \
        (4, 4, 3, 2, 10, (2, 3))
    with pytest.raises(CaspError, match="no option sym"):
        resolve(CompressionConfig(quantizer="aqlm", quantizer_options={"sym": True}), None).build_quantizer()


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8, 9, 12, 15, 16])
def test_packed_codes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 7, 3), generator=torch.Generator().manual_seed(bits))
    codes[0, 0] = (1 << bits) - 1
    meta = {"num_codebooks": 3, "codebook_bits": bits, "group_size": 4, "in_features": 27, "out_features": 5}
    stored = pack_aqlm_codes(codes, bits)
    assert torch.equal(unpack_aqlm_codes(stored, meta), codes)
    assert torch.equal(unpack_aqlm_codes(stored, meta, 2, 4), codes[2:4])
    assert stored.numel() * stored.element_size() * 8 + 3 * (1 << bits) * 4 * 16 + 5 * 16 == \
        aqlm_mod.aqlm_stored_bits(AQLMSetting(3, bits, 4), 5, 27)


@pytest.mark.parametrize("shape,setting", [
    ((16, 64), AQLMSetting(2, 8, 8)), ((24, 20), AQLMSetting(2, 8, 8)), ((8, 130), AQLMSetting(3, 8, 8)),
    ((24, 20), AQLMSetting(3, 4, 4)), ((12, 40), AQLMSetting(2, 3, 4)), ((8, 30), AQLMSetting(1, 10, 8)),
])
def test_stored_bits_are_exact_and_tensors_round_trip(shape, setting):
    w, h = problem(*shape, seed=setting.num_codebooks)
    q = fast(setting)
    qw, deq = q.quantize(w, h, setting)
    assert qw.stored_bits() == q.stored_bits(setting, *shape)
    groups = -(-shape[1] // setting.group_size)
    code_bits = {8: 8, 10: 16}.get(setting.codebook_bits)
    if code_bits is not None:
        assert qw.stored_bits() == shape[0] * groups * setting.num_codebooks * code_bits + \
            setting.num_codebooks * (1 << setting.codebook_bits) * setting.group_size * 16 + shape[0] * 16
    empty = get_format("aqlm").empty_tensors(qw.meta)
    assert {k: (v.dtype, v.shape) for k, v in empty.items()} == {k: (v.dtype, v.shape) for k, v in qw.tensors.items()}
    assert deq.shape == shape and deq.dtype == torch.float32
    assert torch.equal(qw.dequantize(), deq)
    loaded = type(qw)({k: empty[k].copy_(v) for k, v in qw.tensors.items()}, dict(qw.meta))
    assert torch.equal(loaded.dequantize(), deq)
    read = get_format("aqlm").rows(qw)
    assert torch.equal(torch.cat([read(0, 5), read(5, shape[0])]), deq)
    assert quant_loss(w, deq, h) < quant_loss(w, torch.zeros_like(w), h)


def test_deterministic_under_the_seed():
    w, h = problem(24, 48, seed=2)
    s = AQLMSetting(2, 6, 8)
    a, _ = fast(s, seed=3).quantize(w, h, s)
    b, _ = fast(s, seed=3).quantize(w, h, s)
    c, _ = fast(s, seed=4).quantize(w, h, s)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["codebooks"], c.tensors["codebooks"])


@pytest.mark.parametrize("setting,in_f", [(AQLMSetting(2, 8, 8), 64), (AQLMSetting(3, 4, 4), 22),
                                          (AQLMSetting(2, 3, 4), 36)])
def test_cpu_kernel_matches_dequantize_then_matmul(setting, in_f, monkeypatch):
    """Both paths (lookup tables up to LUT_MAX_TOKENS rows, slabs beyond); tolerance 1e-5 relative to
    the output scale (float32 sums in a different order)."""
    w, h = problem(40, in_f, seed=1)
    qw, deq = fast(setting).quantize(w, h, setting)
    bias = torch.randn(40)
    module = PackedLinear.from_quantized(qw, bias)
    monkeypatch.setattr(aqlm_mod, "_CPU_SLAB_ELEMENTS", 8 * in_f)  # several slabs of rows
    assert matmul_kernel("aqlm", "cpu") is aqlm_fast_cpu_matmul   # declines small layers to this kernel
    for shape in [(1, in_f), (2, 3, in_f), (4, 5, in_f)]:
        x = torch.randn(shape)
        ref = torch.nn.functional.linear(x, deq, bias)
        y = aqlm_mod.aqlm_cpu_matmul(module, x)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(module(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_quantizes_without_xtx():
    w, _ = problem(8, 24)
    _, deq = fast().quantize(w, None, AQLMSetting(2, 4, 8))
    assert deq.shape == (8, 24) and float((deq - w).pow(2).mean()) < float(w.pow(2).mean())


def _compress_and_reload(tiny_llama_dir, scene_text, out, options=None, **kw):
    from transformers import AutoModelForCausalLM

    cfg = CompressionConfig(quantizer="aqlm", quantizer_options=options or {}, calib_samples=8,
                            calib_seq_len=32, calib_text=str(scene_text), **kw)
    res = casp.compress(tiny_llama_dir, out, cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.meta["format"] == "aqlm" for m in packed)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)
        # one token takes the lookup-table path; compare the decoder output (lm_head, a plain Linear,
        # may differ in the last bit between the two loads)
        one = ids[:1, :1]
        assert torch.equal(model.model(one).last_hidden_state, res.model.model(one).last_hidden_state)
    return res


def test_uniform_compression_reloads_with_identical_logits(tiny_llama_dir, scene_text, tmp_path):
    res = _compress_and_reload(tiny_llama_dir, scene_text, tmp_path / "out", bits=2.0, allocation="uniform",
                               qk_rank=0)
    q = AQLMQuantizer()
    for row in res.report["layers"]:
        assert row["setting"] == "aqlm-2x8g8"
        assert row["stored_bits"] == q.stored_bits(AQLMSetting(2), row["out_features"], row["in_features"])


def test_rd_allocation_with_lowrank_factors(tiny_llama_dir, scene_text, tmp_path):
    """Small codebooks (16 entries of 4 weights) suit the tiny model; qk_rank 0.25 gives rank-10 factors,
    whose 10 inputs are padded to 12."""
    options = {"codebook_bits": 4, "group_size": 4, "rounds": 2}
    res = _compress_and_reload(tiny_llama_dir, scene_text, tmp_path / "out", options, bits=3.0, qk_rank=0.25)
    rows = res.report["layers"]
    q = AQLMQuantizer(**options)
    for row in rows:
        s = AQLMSetting(row["num_codebooks"], row["codebook_bits"], row["group_size"])
        assert row["stored_bits"] == q.stored_bits(s, row["out_features"], row["in_features"])
    assert 10 in {row["in_features"] for row in rows}
    assert len({row["setting"] for row in rows}) > 1
    assert res.report["average_bits"] <= 3.0
