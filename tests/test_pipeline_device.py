"""--device: every heavy step moves one decoder layer at a time to the device; the model stays on the CPU.

No GPU is needed: "cpu:0" takes every device code path (layer-wise Fisher, offloaded forwards, moves
of XᵀX and weights) while computing on the CPU, and `DeviceSpy` watches each move of a layer.
"""
import pytest
import torch

from casp.config import CompressionConfig
from casp.eval import evaluate as evaluate_module
from casp.io.modelio import load_model, load_processor
from casp.models.adapters import adapter_for
from casp.pipeline import compress
from casp.quant.gptq import GPTQ
from device_spy import DeviceSpy

DEVICE = "cpu:0"


def _cfg(scene_text, **kw):
    base = dict(bits=3.0, calib_samples=8, calib_seq_len=32, calib_text=str(scene_text))
    base.update(kw)
    return CompressionConfig(**base)


def _state(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


def _same_run(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return (sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            and [r["setting"] for r in a.report["layers"]] == [r["setting"] for r in b.report["layers"]])


def test_explicit_cpu_and_the_device_path_give_the_default_bytes(tiny_llama_dir, scene_text, one_torch_thread):
    default = compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    explicit = compress(tiny_llama_dir, None, _cfg(scene_text, device="cpu"), progress=False)
    device_path = compress(tiny_llama_dir, None, _cfg(scene_text, device=DEVICE), progress=False)
    assert _same_run(default, explicit)
    assert _same_run(default, device_path)


@pytest.mark.parametrize("kw", [dict(qk_rank="joint", search_steps=1, search_samples=2), dict(qk_rank="auto")],
                         ids=["joint+search", "auto"])
def test_every_heavy_step_of_a_run_uses_the_device_one_layer_at_a_time(tiny_llama_dir, scene_text, monkeypatch, kw,
                                                                       one_torch_thread):
    model = load_model(tiny_llama_dir)
    layers = adapter_for(model).decoder_layers(model)
    spy = DeviceSpy(monkeypatch, DEVICE)
    spy.watch(layers)
    spy.watch_quantizer(monkeypatch, GPTQ)
    compress(model, None, _cfg(scene_text, device=DEVICE, **kw), processor=load_processor(tiny_llama_dir),
             progress=False)
    assert spy.problems == []
    assert spy.on == set() and spy.quantize_calls > 0
    # sensitivity forward + backward, analysis, compression; the search adds its forwards
    assert len(spy.visits) >= 4 * len(layers) and set(spy.visits) == set(range(len(layers)))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_evaluation_runs_each_layer_on_the_device(tiny_llama_dir, scene_text, monkeypatch, one_torch_thread):
    spy = DeviceSpy(monkeypatch, DEVICE)

    def load_watched(path, *a, **k):
        model = load_model(path, *a, **k)
        spy.index.clear()
        spy.watch(adapter_for(model).decoder_layers(model))
        return model

    monkeypatch.setattr(evaluate_module, "load_model", load_watched)
    plain = evaluate_module.evaluate(tiny_llama_dir, text=str(scene_text), context_length=64, progress=False)
    assert spy.problems and not spy.visits   # plain cpu: layers run where they are, which the spy flags
    spy.problems.clear()
    on_device = evaluate_module.evaluate(tiny_llama_dir, text=str(scene_text), context_length=64, progress=False,
                                         device=DEVICE)
    assert spy.problems == [] and spy.on == set() and spy.visits
    assert on_device["text_ppl"] == plain["text_ppl"]
