"""--finetune-steps: a compressed layer's codebooks and scales tuned to the original layer's output."""
import pytest
import torch
from torch import nn

import casp
from casp.config import CompressionConfig
from casp.recipe import resolve
from casp.errors import CaspError
from casp.nn.packed_linear import PackedLinear
from casp.quant.aqlm import AQLMQuantizer, AQLMSetting
from casp.steps.finetune import Tuning, finetune_layer, layer_finetune_steps, output_mse

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = {"codebook_bits": 4, "group_size": 4, "candidate_bits": (2,), "rounds": 1, "kmeans_iters": 2}


def _compressed_layer0(model_dir, text):
    """Decoder layer 0 of the tiny model with every linear quantized (XᵀX = I), its calibration inputs
    and the original layer's outputs on them."""
    from casp.data.calibration import build_calibration
    from casp.io.modelio import load_model, load_processor
    from casp.models.adapters import adapter_for
    from casp.models.engine import run_layer, walk_layers

    model, processor = load_model(model_dir), load_processor(model_dir)
    adapter = adapter_for(model)
    batches = build_calibration(adapter, processor, model_dir, n_samples=4, seq_len=32, seed=0, text_file=str(text))
    step = next(walk_layers(model, adapter, batches, progress=False))
    targets = run_layer(step.layer, step.inputs)
    q = AQLMQuantizer(**OPTIONS)
    for name, m in list(step.layer.named_modules()):
        if isinstance(m, nn.Linear):
            qw, _ = q.quantize(m.weight.data.float(), None, AQLMSetting(2, 4, 4))
            step.layer.set_submodule(name, PackedLinear.from_quantized(qw, m.bias))
    return step.layer, step.inputs, targets, q


def _stored(layer):
    return {f"{n}.{t}": b.clone() for n, m in layer.named_modules() if isinstance(m, PackedLinear)
            for t, b in m.named_buffers()}


def test_finetuning_lowers_the_layer_output_error(tiny_llama_dir, scene_text):
    from casp.models.engine import run_layer

    layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
    before = _stored(layer)
    r = finetune_layer(layer, inputs, targets, Tuning(q, 12, lr=1e-2))
    after = _stored(layer)
    assert r.kept and r.mse_after < r.mse_before
    assert output_mse(run_layer(layer, inputs), targets) == pytest.approx(r.mse_after, rel=1e-5)
    for key, t in after.items():
        assert t.dtype == before[key].dtype
        if key.endswith("codes"):
            assert torch.equal(t, before[key])
    assert any(not torch.equal(t, before[k]) for k, t in after.items() if k.endswith("codebooks"))


def test_steps_that_would_raise_the_error_are_not_kept(tiny_llama_dir, scene_text):
    layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
    before = _stored(layer)
    r = finetune_layer(layer, inputs, targets, Tuning(q, 3, lr=50.0))
    assert not r.kept and r.mse_after == r.mse_before
    assert all(torch.equal(t, before[k]) for k, t in _stored(layer).items())


def test_zero_steps_change_nothing_and_tuning_is_deterministic(tiny_llama_dir, scene_text):
    layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
    before = _stored(layer)
    r = finetune_layer(layer, inputs, targets, Tuning(q, 0))
    assert r.steps == 0 and all(torch.equal(t, before[k]) for k, t in _stored(layer).items())
    tuned = []
    for _ in range(2):
        layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
        finetune_layer(layer, inputs, targets, Tuning(q, 6, lr=1e-2))
        tuned.append(_stored(layer))
    assert all(torch.equal(t, tuned[1][k]) for k, t in tuned[0].items())


def _cfg(scene_text, **options):
    return CompressionConfig(bits=2.0, quantizer="aqlm", allocation="uniform", qk_rank=0, calib_samples=4,
                             calib_seq_len=32, calib_text=str(scene_text), quantizer_options={**OPTIONS, **options})


def test_pipeline_with_zero_steps_is_byte_identical_and_with_steps_reports_the_gain(tiny_llama_dir, scene_text):
    plain = casp.compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    zero = casp.compress(tiny_llama_dir, None, _cfg(scene_text, layer_finetune_steps=0), progress=False)
    tuned = casp.compress(tiny_llama_dir, None, _cfg(scene_text, layer_finetune_steps=8), progress=False)
    a, b = plain.model.state_dict(), zero.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("finetune" not in lr for lr in plain.report["decoder_layers"])
    entries = [lr["finetune"] for lr in tuned.report["decoder_layers"]]
    assert len(entries) == 2 and all(e["mse_after"] <= e["mse_before"] for e in entries)
    assert any(e["kept"] for e in entries)
    total = tuned.report["finetune"]
    assert total["mse_after"] == pytest.approx(sum(e["mse_after"] for e in entries))
    assert total["mse_after"] < total["mse_before"]
    assert tuned.report["average_bits"] == plain.report["average_bits"]


def test_cli_flag_reaches_the_quantizer_and_only_aqlm_takes_it():
    from casp.cli import _quantizer_options, build_parser

    args = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "aqlm", "--finetune-steps", "50"])
    q = resolve(CompressionConfig(quantizer="aqlm", quantizer_options=_quantizer_options(args)), None).build_quantizer()
    assert layer_finetune_steps(q) == 50 and layer_finetune_steps(AQLMQuantizer()) == 0
    args = build_parser().parse_args(["compress", "-o", "x", "--quantizer", "gptq", "--finetune-steps", "5"])
    with pytest.raises(CaspError, match="does not apply"):
        _quantizer_options(args)
    with pytest.raises(ValueError, match="non-negative"):
        AQLMQuantizer(layer_finetune_steps=-1)
