"""Pipeline-level behaviour: budgets, allocators, ranks, the bound on a real layer stack."""
import pytest
import torch

from casp.config import CompressionConfig
from casp.errors import CaspError
from casp.analysis.sparsity import measure_sparsity
from casp.pipeline import compress


def _cfg(scene_text, **kw):
    base = dict(calib_samples=8, calib_seq_len=32, calib_text=str(scene_text))
    base.update(kw)
    return CompressionConfig(**base)


@pytest.mark.parametrize("allocation", ["rd", "paper"])
@pytest.mark.parametrize("bits", [2.0, 2.6])
def test_allocators_meet_the_budget(tiny_llama_dir, scene_text, allocation, bits):
    res = compress(tiny_llama_dir, None, _cfg(scene_text, bits=bits, allocation=allocation), progress=False)
    assert res.report["average_bits"] <= bits
    assert res.report["average_bits"] > bits - 0.5


def test_target_below_minimum_names_it(tiny_llama_dir, scene_text):
    with pytest.raises(CaspError, match=r"minimum feasible average \d\.\d{3}"):
        compress(tiny_llama_dir, None, _cfg(scene_text, bits=1.0), progress=False)


def test_auto_ranks_use_the_uniform_budget(tiny_llama_dir, scene_text):
    uni = compress(tiny_llama_dir, None, _cfg(scene_text, quantizer="none", qk_rank=0.25), progress=False)
    auto = compress(tiny_llama_dir, None, _cfg(scene_text, quantizer="none", qk_rank="auto"), progress=False)

    def params(r):
        return sum(lr["rank_q"] * (128 + 128) + lr["rank_k"] * (128 + 64) for lr in r.report["decoder_layers"])

    assert params(auto) <= params(uni)
    assert all(lr["rank_q"] >= 1 and lr["rank_k"] >= 1 for lr in auto.report["decoder_layers"])


def test_measured_attention_error_respects_our_bound(tiny_llava_dir, scene_jsonl):
    res = measure_sparsity(tiny_llava_dir, CompressionConfig(calib_jsonl=str(scene_jsonl), calib_samples=4, qk_rank=0.125),
                           progress=False)
    for lr in res["layers"]:
        assert lr["attn_row_l1"] > 0
        assert lr["attn_row_l1"] <= lr["attn_bound_l1"] + 1e-9
        assert lr["attn_map_mse"] <= lr["attn_map_mse_bound"] + 1e-12


def test_layer_granularity_gives_one_setting_per_layer(tiny_llama_dir, scene_text):
    res = compress(tiny_llama_dir, None, _cfg(scene_text, bits=2.6, granularity="layer", qk_rank=0), progress=False)
    assert res.report["average_bits"] <= 2.6
    for i in range(2):
        settings = {(u["bits"], u["group_size"]) for u in res.report["layers"] if f".layers.{i}." in u["name"]}
        assert len(settings) == 1


def test_infeasible_target_refused_before_calibration(tiny_llama_dir, scene_text, monkeypatch):
    """The shapes alone decide feasibility: no calibration batch is built for an impossible target."""
    import casp.steps.load as load_step

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the budget check")

    monkeypatch.setattr(load_step, "build_calibration", no_calibration)
    for qk_rank in (0.25, "joint"):
        with pytest.raises(CaspError, match=r"minimum feasible average \d\.\d{3}"):
            compress(tiny_llama_dir, None, _cfg(scene_text, bits=0.5, qk_rank=qk_rank), progress=False)


def test_in_memory_model_compresses_like_its_directory(tiny_llama_dir, scene_text):
    import casp
    from casp.io.modelio import load_processor

    cfg = _cfg(scene_text, bits=3.0)
    from_dir = compress(tiny_llama_dir, None, cfg, progress=False)
    model = casp.load(tiny_llama_dir)
    in_memory = compress(model, None, cfg, processor=load_processor(tiny_llama_dir), progress=False)
    assert in_memory.model is model
    assert in_memory.report["stored_bits"] == from_dir.report["stored_bits"]
    ids = torch.randint(5, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(in_memory.model(ids).logits, from_dir.model(ids).logits)


def test_feasibility_counts_per_layer_units(tiny_llama_dir, scene_text, monkeypatch):
    """Per-layer allocation makes a layer's matrices share a setting: the check uses the allocator's units."""
    import casp.steps.load as load_step
    from casp.codec import Codec
    from casp.io.modelio import load_model
    from casp.models.adapters import adapter_for
    from casp.recipe import resolve
    from casp.steps.allocation import _problem
    from casp.steps.ranks import choose_ranks
    from casp.steps.units import plan_units

    cfg = _cfg(scene_text, qk_rank=0.25, granularity="layer")
    model = load_model(tiny_llama_dir)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    q = Codec.of(resolve(cfg, tiny_llama_dir))
    units = plan_units(layers, adapter, choose_ranks(layers, adapter, 0.25, {}))
    for u in units:
        u.distortion = {s.label(): 0.0 for s in q.candidates()}
    a_units, _ = _problem(units, q, "layer", "rd")
    floor = sum(min(u.cost_bits.values()) for u in a_units) / sum(u.num_weights for u in units)
    monkeypatch.setattr(load_step, "build_calibration", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(CaspError, match="minimum feasible"):
        compress(tiny_llama_dir, None, _cfg(scene_text, qk_rank=0.25, bits=floor - 1e-4), progress=False)


def _snap(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w dequantized from an affine `bits`-bit grid with groups of `group` columns (as GGUF Q4_1 by 32)."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / ((1 << bits) - 1)).half().float()
    return (torch.round((g - lo) / step) * step + lo).reshape(w.shape)


def test_weights_on_a_source_grid_leave_its_settings_out_and_say_so(tiny_llama_dir, scene_text, tmp_path):
    """A checkpoint whose MLP weights lie on 4-bit grids by 32 and attention weights on 8-bit grids by 32
    (as a model converted from GGUF) never gets 4b-g32 or 8b-g32; the report says which grids were found."""
    import shutil

    from safetensors.torch import load_file, save_file

    marked = tmp_path / "on_grid"
    shutil.copytree(tiny_llama_dir, marked)
    tensors = load_file(marked / "model.safetensors")
    for k, w in tensors.items():
        if k.endswith("proj.weight"):
            tensors[k] = _snap(w, 4 if ".mlp." in k else 8, 32).contiguous()
    save_file(tensors, marked / "model.safetensors", metadata={"format": "pt"})
    res = compress(marked, None, _cfg(scene_text, bits=4.0, granularity="matrix"), progress=False)
    assert res.report["excluded_candidates"]["settings"] == ["4b-g32", "8b-g32"]
    assert "6 on 4b-g32, 8 on 8b-g32" in res.report["excluded_candidates"]["why"]
    settings = {u["setting"] for u in res.report["layers"]}
    assert not settings & {"4b-g32", "8b-g32"}
    plain = compress(tiny_llama_dir, None, _cfg(scene_text, bits=4.0, granularity="matrix"), progress=False)
    assert "excluded_candidates" not in plain.report


def test_the_stand_in_text_preset_is_asked_for_not_given(tiny_llama_dir, scene_text, tmp_path):
    """GPTQ is as published on casp's own calibration text too, and the recipe says why; `--preset
    stand-in-text` shrinks XᵀX's cross-terms (--hessian-shrink 0.5) and says where the shrink came from; the
    user's own flag wins over the preset."""
    from casp.data.calibration import uses_builtin_text
    from casp.embedded import EMBEDDED_MODEL_DIR
    from casp.quant.gptq import STAND_IN_TEXT_SHRINK

    base = dict(bits=3.0, allocation="uniform", qk_rank=0, calib_samples=2, calib_seq_len=32)
    default = compress(tiny_llama_dir, None, CompressionConfig(**base), progress=False)
    assert default.recipe.preset == "none" and default.recipe.quantizer_options["shrink"] == 0.0
    why = default.recipe.reasons["preset"]
    assert "Gemma-3-270M" in why and "--preset stand-in-text" in why
    stand_in = compress(tiny_llama_dir, None, CompressionConfig(**base, preset="stand-in-text"), progress=False)
    assert stand_in.recipe.quantizer_options["shrink"] == STAND_IN_TEXT_SHRINK
    assert stand_in.recipe.reasons["quantizer_options.shrink"] == "preset stand-in-text"
    told = compress(tiny_llama_dir, None, CompressionConfig(**base, preset="stand-in-text",
                                                            quantizer_options={"shrink": 0.0}), progress=False)
    assert told.recipe.quantizer_options["shrink"] == 0.0 and "quantizer_options.shrink" not in told.recipe.reasons
    own = compress(tiny_llama_dir, None, _cfg(scene_text, **{**base, "calib_samples": 2}), progress=False)
    assert own.recipe.preset == "none" and own.recipe.quantizer_options["shrink"] == 0.0
    ids = torch.randint(5, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(stand_in.model(ids).logits, told.model(ids).logits)
    assert not uses_builtin_text(EMBEDDED_MODEL_DIR) and uses_builtin_text(tiny_llama_dir)
    assert not uses_builtin_text(tiny_llama_dir, text_file="t.txt")
