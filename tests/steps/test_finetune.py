"""--finetune-steps: a compressed layer's continuous stored parameters tuned to the original layer's output."""
import pytest
import torch
from torch import nn

import casp
from casp.config import CompressionConfig
from casp.recipe import resolve
from casp.errors import CaspError
from casp.nn.packed_linear import PackedLinear
from casp.quant.aqlm import AQLMQuantizer, AQLMSetting
from casp.steps.finetune import Trainable, Tuning, finetune_layer, output_mse, split_held

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
    r = finetune_layer(layer, inputs, targets, Tuning(12, lr=1e-2))
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
    r = finetune_layer(layer, inputs, targets, Tuning(3, lr=50.0))
    assert not r.kept and r.mse_after == r.mse_before
    assert all(torch.equal(t, before[k]) for k, t in _stored(layer).items())


def test_zero_steps_change_nothing_and_tuning_is_deterministic(tiny_llama_dir, scene_text):
    layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
    before = _stored(layer)
    r = finetune_layer(layer, inputs, targets, Tuning(0))
    assert r.steps == 0 and all(torch.equal(t, before[k]) for k, t in _stored(layer).items())
    tuned = []
    for _ in range(2):
        layer, inputs, targets, q = _compressed_layer0(tiny_llama_dir, scene_text)
        finetune_layer(layer, inputs, targets, Tuning(6, lr=1e-2))
        tuned.append(_stored(layer))
    assert all(torch.equal(t, tuned[1][k]) for k, t in tuned[0].items())


def _cfg(scene_text, quantizer="aqlm", **options):
    return CompressionConfig(bits=2.0, quantizer=quantizer, allocation="uniform", qk_rank=0, calib_samples=4,
                             calib_seq_len=32, calib_text=str(scene_text),
                             quantizer_options=OPTIONS if quantizer == "aqlm" else {}, **options)


def test_pipeline_with_zero_steps_is_byte_identical_and_with_steps_reports_the_gain(tiny_llama_dir, scene_text):
    plain = casp.compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    zero = casp.compress(tiny_llama_dir, None, _cfg(scene_text, finetune_steps=0), progress=False)
    tuned = casp.compress(tiny_llama_dir, None, _cfg(scene_text, finetune_steps=8), progress=False)
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



def _every_kind_layer():
    """Layer 0 of a tiny Qwen2 (q/k/v biases) holding every kind of stored parameter: q a low-rank pair (a
    packed scalar `down`, a 16-bit `up`), k E8 under incoherence with a bias, v AQLM with a bias, o E8 under
    incoherence-scaled, the MLP scalar; its norms as they are."""
    from tiny_models import tiny_batches, tiny_model

    from casp.nn.lowrank_linear import LowRankLinear
    from casp.quant.base import get_quantizer_class
    from casp.steps.quantize import quantize_unit, stored_module
    from casp.transforms.base import get_transform_class

    model = tiny_model("qwen2")
    layer = model.model.layers[0]
    x = torch.randn(2, 12, model.config.hidden_size)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(12)[None]), "attention_mask": None}
    target = layer(x, **kwargs).detach()

    def stored(m, quantizer, bits, transform=None, bias=True):
        w = m.weight.data.float()
        qw, _, params = quantize_unit(w, torch.eye(w.shape[1]), quantizer.uniform_setting(bits), quantizer, transform, seed=1)
        return stored_module(qw, params, m.bias.data.clone() if bias and m.bias is not None else None)

    scalar = get_quantizer_class("rtn")()
    q = layer.self_attn.q_proj
    low = LowRankLinear.from_factors(q.weight.data[:, :8].clone(), torch.eye(8, q.in_features), q.bias.data)
    low.down = stored(low.down, scalar, 3, bias=False)
    layer.self_attn.q_proj = low
    layer.self_attn.k_proj = stored(layer.self_attn.k_proj, get_quantizer_class("e8")(), 2,
                                    get_transform_class("incoherence")())
    layer.self_attn.v_proj = stored(layer.self_attn.v_proj, AQLMQuantizer(**OPTIONS), 2)
    layer.self_attn.o_proj = stored(layer.self_attn.o_proj, get_quantizer_class("e8")(), 2,
                                    get_transform_class("incoherence-scaled")())
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(layer.mlp, name, stored(getattr(layer.mlp, name), scalar, 3))
    return layer, x, kwargs, target


def test_every_kind_of_stored_parameter_receives_gradients():
    layer, x, kwargs, target = _every_kind_layer()
    with Trainable(layer) as t, torch.enable_grad():
        F_out = layer(x, **kwargs)
        ((F_out - target) ** 2).mean().backward()
        grads = {}
        for n, m in t.tuned.items():
            for name, p in m.tuned.items():
                grads[f"{n}.{name}"] = p.grad
        for n, p in t.plain.items():
            grads[n] = p.grad
        for n, p in layer.named_parameters():
            grads.setdefault(n, p.grad)
        assert len(t.parameters) == len({id(p) for p in t.parameters})
    kinds = {
        "scalar scales": "mlp.gate_proj.scales",
        "E8 stage scales (inside a transform)": "self_attn.k_proj.inner.scales",
        "AQLM codebooks": "self_attn.v_proj.codebooks",
        "AQLM scales": "self_attn.v_proj.scales",
        "low-rank factor, packed": "self_attn.q_proj.down.scales",
        "low-rank factor, 16-bit": "self_attn.q_proj.up.weight",
        "bias of a low-rank pair": "self_attn.q_proj.up.bias",
        "bias of a transformed linear": "self_attn.k_proj.bias",
        "bias of a packed linear": "self_attn.v_proj.bias",
        "incoherence-scaled row vector": "self_attn.o_proj.transform_scales_out",
        "incoherence-scaled column vector": "self_attn.o_proj.transform_scales_in",
        "input norm": "input_layernorm.weight",
        "post-attention norm": "post_attention_layernorm.weight",
    }
    for kind, name in kinds.items():
        assert name in grads, kind
        g = grads[name]
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, kind


def test_leaving_without_keep_restores_every_tensor_and_dtype_to_the_bit():
    layer, x, kwargs, target = _every_kind_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with Trainable(layer) as t, torch.enable_grad():
        opt = torch.optim.SGD(t.parameters, lr=0.5)
        ((layer(x, **kwargs) - target) ** 2).mean().backward()
        opt.step()
    after = layer.state_dict()
    assert set(after) == set(before)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in layer.parameters() if not p.is_floating_point())


def test_the_held_out_batches_are_one_in_eight_and_never_trained_on():
    assert [split_held(n) for n in (1, 2, 8, 16, 124)] == [0, 1, 1, 2, 15]


def test_a_layer_of_every_kind_tunes_and_never_raises_the_held_out_error():
    from casp.models.engine import LayerInputs, run_layer

    _, x, kwargs, target = _every_kind_layer()
    inputs = LayerInputs([x[i % 2:i % 2 + 1] for i in range(8)], [kwargs] * 8)
    targets = [target[i % 2:i % 2 + 1] for i in range(8)]
    kept = {}
    for lr, steps in ((1e-2, 20), (100.0, 5)):
        layer, *_ = _every_kind_layer()
        before = output_mse(run_layer(layer, inputs)[-1:], targets[-1:])   # one batch in eight is held out
        r = finetune_layer(layer, inputs, targets, Tuning(steps, lr=lr))
        after = output_mse(run_layer(layer, inputs)[-1:], targets[-1:])
        assert r.mse_before == pytest.approx(before)
        assert after <= before and after == pytest.approx(r.mse_after, rel=1e-6)
        kept[lr] = r.kept
    assert kept == {1e-2: True, 100.0: False}


def test_a_step_takes_its_rows_of_every_batched_argument_and_shares_the_rest():
    from casp.models.engine import LayerInputs
    from casp.steps.finetune import _rows, minibatches

    mask, cos = torch.zeros(1, 1, 5, 5), torch.randn(1, 5, 4)
    kwargs = {"attention_mask": torch.randn(3, 1, 5, 5), "position_embeddings": (cos, torch.randn(3, 5, 4)),
              "shared": mask, "flag": None}
    cut = _rows(kwargs, slice(2, 4), 3)
    assert torch.equal(cut["attention_mask"], kwargs["attention_mask"][2:3])
    assert cut["position_embeddings"][0] is cos and cut["position_embeddings"][1].shape[0] == 1
    assert cut["shared"] is mask and cut["flag"] is None
    inputs = LayerInputs([torch.zeros(3, 5, 2), torch.zeros(1, 5, 2), torch.zeros(3, 5, 2)], [{}] * 3)
    assert minibatches(inputs, [0, 2], 2) == [(0, slice(0, 2)), (0, slice(2, 4)), (2, slice(0, 2)), (2, slice(2, 4))]
