"""Streamed compression: layers read from the safetensors one at a time, written as they finish, resumable."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from casp.config import CompressionConfig
from casp.errors import CaspError
from casp.io.lazy_checkpoint import LazyCheckpoint, model_key_map
from casp.io.modelio import load_model
from casp.io.storage import load_compressed
from casp.models.activations import SpillingActivations
from casp.pipeline import compress
from casp.run import RunOptions

CALIB = dict(calib_samples=8, calib_seq_len=32)


def _logits(path, ids):
    model = load_compressed(path)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_spilling_activations_round_trip_through_disk(tmp_path):
    tensors = [torch.randn(1, 5, 8) for _ in range(4)]
    store = SpillingActivations(tensors, max_bytes=2 * 5 * 8 * 2, spill_dir=tmp_path)
    assert store.spilled == 2 and store.bytes_in_memory == 2 * 5 * 8 * 2
    for t, back in zip(tensors, store):
        assert back.dtype == torch.float32
        assert torch.equal(back, t.half().float())
    store.drop()
    assert not list(tmp_path.iterdir())


def test_key_map_undoes_legacy_names_and_prefixes():
    model_keys = ["model.language_model.layers.0.w", "model.vision_tower.x", "lm_head.weight", "model.norm.weight"]
    ckpt = ["language_model.model.layers.0.w", "vision_tower.x", "language_model.lm_head.weight"]
    mapping = {r"^language_model.model": "model.language_model", r"^language_model.lm_head": "lm_head"}
    got = model_key_map(model_keys, ckpt, mapping, tied={"model.norm.weight"})
    assert got == {"model.language_model.layers.0.w": "language_model.model.layers.0.w",
                   "model.vision_tower.x": "vision_tower.x", "lm_head.weight": "language_model.lm_head.weight"}
    with pytest.raises(CaspError, match="no tensor for 1 model weights"):
        model_key_map(model_keys, ckpt, mapping)


def test_lazy_checkpoint_reads_shards_and_refuses_missing_ones(tmp_path, tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    ckpt = LazyCheckpoint(tmp_path / "sharded")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.get(name), model.state_dict()[name])
    shards[-1].unlink()
    with pytest.raises(CaspError, match="lists tensors no shard holds"):
        LazyCheckpoint(tmp_path / "sharded")


@pytest.mark.parametrize("allocation", ["uniform", "rd"])
def test_streamed_run_matches_the_in_memory_run(tmp_path, tiny_llava_dir, allocation):
    """Uniform: the same plan. rd: the same budget (fp16 activations may tip a close choice). Outputs as
    close to the original's as the in-memory run's (this random model's outputs move a lot at 3 bits)."""
    cfg = dict(bits=3, allocation=allocation, **CALIB)
    whole = compress(tiny_llava_dir, tmp_path / "whole", CompressionConfig(**cfg), progress=False)
    streamed = compress(tiny_llava_dir, tmp_path / "streamed", CompressionConfig(stream=True, **cfg), progress=False)
    assert streamed.model is None and streamed.out == tmp_path / "streamed"
    if allocation == "uniform":
        assert streamed.report["average_bits"] == whole.report["average_bits"]
        assert [u["setting"] for u in streamed.report["layers"]] == [u["setting"] for u in whole.report["layers"]]
    else:
        assert 2.9 < streamed.report["average_bits"] <= 3.0 and 2.9 < whole.report["average_bits"] <= 3.0
    assert json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (tmp_path / "streamed.partial").exists()
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = _logits(tmp_path / "whole", ids), _logits(tmp_path / "streamed", ids)
    with torch.no_grad():
        fp = load_model(tiny_llava_dir)(input_ids=ids).logits
    whole_error, streamed_error = (a - fp).norm() / fp.norm(), (b - fp).norm() / fp.norm()
    assert torch.isfinite(b).all() and streamed_error < 1.25 * whole_error + 0.05


@pytest.mark.parametrize("qk_rank", [0, 0.5])
def test_streamed_fp16_run_equals_in_memory_closely(tmp_path, tiny_llava_dir, qk_rank):
    """No quantizer: the same weights when nothing depends on the data; with data-aware low-rank Q/K the
    factors see fp16-rounded activations, so logits differ by about that rounding."""
    cfg = dict(quantizer="none", qk_rank=qk_rank, **CALIB)
    compress(tiny_llava_dir, tmp_path / "whole", CompressionConfig(**cfg), progress=False)
    compress(tiny_llava_dir, tmp_path / "streamed", CompressionConfig(stream=True, **cfg), progress=False)
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    a, b = _logits(tmp_path / "whole", ids), _logits(tmp_path / "streamed", ids)
    if qk_rank == 0:
        assert torch.equal(a, b)
    else:
        assert 0 < (a - b).norm() / a.norm() < 3e-2


def test_streamed_auto_ranks_read_each_layer_again_to_measure_it(tmp_path, tiny_llama_dir, scene_text):
    """Auto ranks measure after the analysis walk has released every layer; the device path gives the same bytes."""
    cfg = dict(bits=3.0, qk_rank="auto", calib_text=str(scene_text), stream=True, **CALIB)
    cpu = compress(tiny_llama_dir, tmp_path / "cpu", CompressionConfig(**cfg), progress=False)
    dev = compress(tiny_llama_dir, tmp_path / "dev", CompressionConfig(device="cpu:0", **cfg), progress=False)
    assert 2.5 < cpu.report["average_bits"] <= 3.0
    files = sorted(f.name for f in cpu.out.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in dev.out.glob("*.safetensors"))
    assert all(filecmp.cmp(cpu.out / f, dev.out / f, shallow=False) for f in files)


def test_streamed_output_loads_with_from_pretrained(tmp_path, tiny_llama_dir, scene_text):
    import transformers

    import casp.io.hf_integration  # noqa: F401  (registers the quantizer)

    compress(tiny_llama_dir, tmp_path / "out", CompressionConfig(bits=3, calib_text=str(scene_text), stream=True,
                                                                  **CALIB), progress=False)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, _logits(tmp_path / "out", ids))


def test_memory_cap_spills_without_changing_the_output(tmp_path, tiny_llama_dir, scene_text, monkeypatch):
    spilled = []
    original = SpillingActivations.append

    def counting(self, t):
        original(self, t)
        spilled.append(self.spilled)

    monkeypatch.setattr(SpillingActivations, "append", counting)
    cfg = dict(bits=3, allocation="uniform", calib_text=str(scene_text), **CALIB)
    compress(tiny_llama_dir, tmp_path / "free", CompressionConfig(stream=True, **cfg), progress=False)
    assert max(spilled) == 0
    compress(tiny_llama_dir, tmp_path / "capped", CompressionConfig(max_memory=1e-5, **cfg), progress=False)
    assert max(spilled) > 0
    for f in ("layer-00000.safetensors", "layer-00001.safetensors", "model-rest.safetensors"):
        assert filecmp.cmp(tmp_path / "free" / f, tmp_path / "capped" / f, shallow=False)


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
def test_layerwise_fisher_equals_the_full_backward(tiny_llava_dir, labels):
    from casp.analysis.sensitivity import output_fisher, output_fisher_layerwise
    from casp.data.calibration import build_calibration
    from casp.io.modelio import load_model, load_processor
    from casp.models.adapters import adapter_for
    from casp.models.streaming import load_streamed

    model = load_model(tiny_llava_dir)
    adapter = adapter_for(model)
    batches = build_calibration(adapter, load_processor(tiny_llava_dir), tiny_llava_dir, n_samples=4, seq_len=32, seed=0)
    full = output_fisher(model, adapter, batches, progress=False, labels=labels, seed=3)
    skeleton, source = load_streamed(tiny_llava_dir)
    layerwise = output_fisher_layerwise(skeleton, adapter, batches, source, progress=False, labels=labels, seed=3)
    assert set(full) == set(layerwise) and len(full) == 2 * len(adapter.linear_names())
    for name in full:
        assert torch.allclose(layerwise[name], full[name], rtol=2e-2, atol=1e-12), name


def test_layerwise_fisher_computes_no_weight_gradient(tiny_llava_dir):
    from casp.analysis.sensitivity import output_fisher_layerwise
    from casp.data.calibration import build_calibration
    from casp.io.modelio import load_model, load_processor
    from casp.models.adapters import adapter_for
    from casp.models.streaming import InMemoryLayers

    model = load_model(tiny_llava_dir)
    adapter = adapter_for(model)
    batches = build_calibration(adapter, load_processor(tiny_llava_dir), tiny_llava_dir, n_samples=2, seq_len=32, seed=0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values())
    fisher = output_fisher_layerwise(model, adapter, batches, InMemoryLayers(), progress=False)
    assert fisher and all(bool((f > 0).any()) for f in fisher.values())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_partial_run_needs_resume_and_the_same_options(tmp_path, tiny_llama_dir, scene_text):
    cfg = dict(bits=3, allocation="uniform", calib_text=str(scene_text), **CALIB)
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "state.json").write_text(json.dumps({"bits": 2.0}))
    with pytest.raises(CaspError, match="interrupted run: continue it with --resume"):
        compress(tiny_llama_dir, tmp_path / "out", CompressionConfig(stream=True, **cfg), progress=False)
    with pytest.raises(CaspError, match="used other options"):
        compress(tiny_llama_dir, tmp_path / "out", CompressionConfig(**cfg), progress=False,
                 options=RunOptions(resume=True))
    assert (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_failure_before_any_work_leaves_no_partial_directory(tmp_path, tiny_llama_dir):
    with pytest.raises(CaspError):
        compress(tiny_llama_dir, tmp_path / "out", CompressionConfig(stream=True, calib_text=str(tmp_path / "nope.txt"),
                                                                     **CALIB), progress=False)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def six_layer_llama(tmp_path_factory):
    """A tiny Llama with 6 layers, to kill a compression in the middle of its walk."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama6"), hidden=128, intermediate=256, layers=6, kv_heads=2,
                           max_positions=256, max_shard_size="1MB")


def _cli(model, out, *extra):
    return ["compress", str(model), "-o", str(out), "--bits", "2.5", "--stream", "--calib-samples", "8",
            "--calib-seq-len", "64", "--quiet", *extra]


# The victim is the real CLI in its own process; it SIGKILLs itself at a chosen point: in the middle of
# compressing layer 3, or after layer 2's weights are on disk but before its record and the next inputs are.
VICTIM = """
import os, signal, sys
import casp.io.stream_writer as w, casp.pipeline as p
from casp.cli import main
point = sys.argv[1]
if point == "mid-layer":
    real = p.compress_layer
    def compress_layer(run, step, *a, **k):
        if step.index == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(run, step, *a, **k)
    p.compress_layer = compress_layer
else:
    real = w._write_atomic
    def write_atomic(path, write):
        if path.name == "layer-00002.json":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, write)
    w._write_atomic = write_atomic
sys.exit(main(sys.argv[2:]))
"""


RUN = dict(env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(six_layer_llama, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    done = subprocess.run([sys.executable, "-m", "casp", *_cli(six_layer_llama, out, "--calib-text", str(scene_text))],
                          **RUN)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("point", ["mid-layer", "between-files"])
def test_resume_after_sigkill_gives_the_same_bytes(tmp_path, six_layer_llama, scene_text, uninterrupted, point):
    extra = ("--calib-text", str(scene_text))
    run = RUN
    killed = subprocess.run([sys.executable, "-c", VICTIM, point, *_cli(six_layer_llama, tmp_path / "b", *extra)], **run)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / "b.partial"
    assert (partial / "layer-00002.safetensors").exists() and not (tmp_path / "b").exists()
    assert (partial / "layer-00002.json").exists() == (point == "mid-layer")
    resumed = subprocess.run([sys.executable, "-m", "casp", *_cli(six_layer_llama, tmp_path / "b", *extra),
                              "--resume"], **run)
    assert resumed.returncode == 0, resumed.stderr
    a = uninterrupted
    a_files = sorted(p.name for p in a.iterdir())
    assert a_files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([f for f in a_files if f.startswith("layer-")]) == 6
    for name in a_files:
        if not name.startswith("report."):
            assert filecmp.cmp(a / name, tmp_path / "b" / name, shallow=False), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, tmp_path / "b"))
    for timing in ("seconds", "phase_seconds", "plan_seconds", "peak_rss_mb", "peak_device_mb", "config"):
        ra.pop(timing, None), rb.pop(timing, None)
    for row in ra["decoder_layers"] + rb["decoder_layers"]:
        row.pop("seconds")
    assert ra == rb


def test_a_model_too_big_for_memory_is_streamed_by_default(tmp_path, tiny_llama_dir, scene_text, monkeypatch):
    import casp.models.streaming as streaming

    cfg = dict(bits=3, allocation="uniform", calib_text=str(scene_text), **CALIB)
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**12)
    assert compress(tiny_llama_dir, tmp_path / "fits", CompressionConfig(**cfg), progress=False).model is not None
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**5)
    result = compress(tiny_llama_dir, tmp_path / "big", CompressionConfig(**cfg), progress=False)
    assert result.model is None and result.config.stream
    assert (tmp_path / "big" / "layer-00000.safetensors").is_file()


def test_plan_state_is_plain_json_and_round_trips():
    from casp.quant.scalar import QuantSpec
    from casp.steps.units import Plan, Role, Unit, plan_state, restore_plan_state

    units = [Unit(0, "self_attn.q_proj", Role.DOWN, "attn_in", 8, 32, 100, "q", 8, {"2b-g128": 0.5})]
    plan = {units[0].key: QuantSpec(3, 64, True)}
    state = json.loads(json.dumps(plan_state(Plan([{"q": 8, "k": 0}], units, plan, {"kept": "joint"}))))
    back = restore_plan_state(state, QuantSpec)
    assert (back.ranks, back.units, back.settings, back.summary) == ([{"q": 8, "k": 0}], units, plan, {"kept": "joint"})
    state["labels"][str(units[0].key)] = "4b-ch"
    with pytest.raises(CaspError, match="saved plan does not match"):
        restore_plan_state(state, QuantSpec)
