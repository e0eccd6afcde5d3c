"""Measured damage: each layer's estimate scaled to the held-out KL the layer causes at the probe settings."""
import math

import pytest
import torch

import casp.steps.plan as plan_step
from casp.config import CompressionConfig
from casp.pipeline import compress
from casp.steps.layer_scales import apply_layer_scales, scale_at
from casp.steps.measured import Measured
from casp.steps.units import Role, Unit, UnitKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(scene_text, **kw):
    base = dict(bits=3.25, qk_rank=0, calib_samples=16, calib_seq_len=32, calib_text=str(scene_text))
    return CompressionConfig(**{**base, **kw})


def test_scale_is_exact_at_probes_log_linear_between_and_flat_beyond():
    points = [(2.0, 0.5), (3.0, 2.0), (4.0, 8.0)]
    assert [scale_at(points, b) for b in (2.0, 3.0, 4.0)] == pytest.approx([0.5, 2.0, 8.0])
    assert scale_at(points, 2.5) == pytest.approx(1.0)   # geometric mean of 0.5 and 2
    assert scale_at(points, 1.0) == 0.5 and scale_at(points, 8.0) == 8.0
    assert scale_at([(3.0, 4.0)], 2.0) == scale_at([(3.0, 4.0)], 6.0) == 4.0


class _Codec:
    """Bits per weight of a label: its leading digit."""

    def candidates(self):
        return [_Setting(b) for b in (2, 3, 4)]

    def stored_bits(self, setting, out_features, in_features):
        return setting.bits * out_features * in_features


class _Setting:
    def __init__(self, bits):
        self.bits = bits

    def label(self):
        return f"{self.bits}b"


def test_every_damage_of_a_layer_and_its_qk_options_scale_without_changing_shared_tables():
    from casp.steps.joint import QKOption

    units = [Unit(0, "q", Role.DENSE, "attn_in", 4, 4, 16, qk="q", distortion={"2b": 1.0, "4b": 0.1}),
             Unit(1, "v", Role.DENSE, "attn_in", 4, 4, 16, distortion={"2b": 1.0, "4b": 0.1})]
    table = {UnitKey(0, "q"): {"dense:2b": (QKOption(0, _Setting(2)), 32, 1.0),
                               "r2:4b": (QKOption(2, _Setting(4)), 32, 3.0)}}
    measured = Measured(None, units, qk_tables=table, layer_scales={0: [(2.0, 10.0), (4.0, 1000.0)]})
    apply_layer_scales(measured, _Codec())
    assert units[0].distortion == pytest.approx({"2b": 10.0, "4b": 100.0})
    assert units[1].distortion == {"2b": 1.0, "4b": 0.1}   # no scale measured for layer 1: the estimate
    scaled = measured.qk_tables[UnitKey(0, "q")]
    assert scaled["dense:2b"][2] == pytest.approx(10.0) and scaled["r2:4b"][2] == pytest.approx(3000.0)
    assert table[UnitKey(0, "q")]["dense:2b"][2] == 1.0   # the cached table is untouched


def _plan(tiny_llama_dir, scene_text, monkeypatch, factor):
    """The measured plan of a run whose estimate of layer 0 is multiplied by `factor`."""
    from casp.steps import measure

    honest = measure.measure_distortions

    def skewed(run, measured, layers, analysis):
        honest(run, measured, layers, analysis)
        for u in measured.units:
            if u.layer == 0 and 0 in layers:
                u.distortion = {k: v * factor for k, v in u.distortion.items()}

    monkeypatch.setattr(plan_step, "measure_distortions", skewed)
    seen = {}
    real = plan_step.plan_ranks_and_units

    def keep(run, batches, held=()):
        seen["measured"] = real(run, batches, held)
        return seen["measured"]

    monkeypatch.setattr("casp.pipeline.plan_ranks_and_units", keep)
    res = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=2), progress=False)
    return seen["measured"], res


def test_scaled_damages_do_not_depend_on_the_estimates_layer_scale(tiny_llama_dir, scene_text, monkeypatch):
    """A layer's estimate off by any constant (what does not transfer between models) is undone by its
    measured scale, trusted in full: the damages the allocator sees, and its answer, are the same."""
    import casp.steps.layer_scales as scales_step

    monkeypatch.setattr(scales_step, "shrink_layer_effects", lambda x: (x.double().mean(1), 1.0))
    honest, a = _plan(tiny_llama_dir, scene_text, monkeypatch, 1.0)
    skewed, b = _plan(tiny_llama_dir, scene_text, monkeypatch, 1000.0)
    assert honest.layer_scales[0][0][1] == pytest.approx(1000.0 * skewed.layer_scales[0][0][1], rel=1e-6)
    for u, v in zip(honest.units, skewed.units):
        for label in u.distortion:
            assert v.distortion[label] == pytest.approx(u.distortion[label], rel=1e-6, abs=1e-12)
    assert [r["setting"] for r in a.report["layers"]] == [r["setting"] for r in b.report["layers"]]


def test_a_scale_is_the_layers_held_out_kl_over_its_estimate_at_the_probe(tiny_llama_dir, scene_text, monkeypatch):
    measured, res = _plan(tiny_llama_dir, scene_text, monkeypatch, 1.0)
    points = measured.layer_scales[1]
    assert len(points) == 1 and 3 < points[0][0] < 3.5   # one probe: 3b-g128
    assert all(s > 0 and math.isfinite(s) for _, s in points)
    assert res.report["layer_scales"]["1"] == [[round(b, 4), s] for b, s in points]
    assert res.recipe.damage == "measured"


def test_estimate_alone_measures_no_scales_and_stores_what_it_stored_before(tiny_llama_dir, scene_text):
    est = compress(tiny_llama_dir, None, _cfg(scene_text, damage="estimate"), progress=False)
    assert "layer_scales" not in est.report
    ids = torch.randint(5, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    again = compress(tiny_llama_dir, None, _cfg(scene_text, damage="estimate"), progress=False)
    with torch.no_grad():
        assert torch.equal(est.model(ids).logits, again.model(ids).logits)


def test_without_held_out_samples_the_recipe_says_it_uses_the_estimate(tiny_llama_dir, scene_text):
    from casp.recipe import resolve

    recipe = resolve(_cfg(scene_text, check_samples=0), str(tiny_llama_dir))
    assert recipe.damage == "estimate" and "held-out" in recipe.reasons["damage"]
    assert resolve(_cfg(scene_text), str(tiny_llama_dir)).damage == "measured"


def test_a_skew_far_beyond_sample_noise_is_still_undone(tiny_llama_dir, scene_text, monkeypatch):
    """With the shrinkage on, a 1000-fold error of one layer's estimate is far outside the noise of the
    held-out samples: the scales keep nearly all of their spread, and the damages stay within a few percent."""
    honest, _ = _plan(tiny_llama_dir, scene_text, monkeypatch, 1.0)
    skewed, res = _plan(tiny_llama_dir, scene_text, monkeypatch, 1000.0)
    assert skewed.scale_trust["3b-g128"] > 0.99
    assert res.report["layer_scale_trust"] == skewed.scale_trust
    for u, v in zip(honest.units, skewed.units):
        for label in u.distortion:
            assert v.distortion[label] == pytest.approx(u.distortion[label], rel=0.05, abs=1e-12)


def _rows(kls):
    """One layer's held-out rows as (summed KL, tokens), 10 tokens each."""
    return [(10 * k, 10) for k in kls]


def test_layers_that_differ_only_by_sample_noise_share_one_scale():
    from casp.steps.layer_scales import shrink_scales

    g = torch.Generator().manual_seed(0)
    noise = lambda: (1 + 0.3 * torch.rand(4, generator=g)).tolist()   # noqa: E731
    per_layer = {i: (3.0, _rows(noise()), 1.0) for i in range(24)}
    scales, factor = shrink_scales(per_layer)
    assert factor < 0.5
    spread = max(scales.values()) / min(scales.values())
    raw = [sum(t for t, _ in r) / sum(c for _, c in r) for _, r, _ in per_layer.values()]
    assert spread < max(raw) / min(raw)


def test_a_sample_hard_for_every_layer_is_not_noise():
    """Layers 10-fold apart, measured on samples whose difficulty varies 100-fold but alike for all layers:
    the two-way layout sees no noise, and the scales keep their full spread."""
    from casp.steps.layer_scales import shrink_scales

    difficulty = [0.01, 0.1, 1.0, 0.3]
    per_layer = {0: (3.0, _rows(difficulty), 1.0), 1: (3.0, _rows([10 * d for d in difficulty]), 1.0),
                 2: (3.0, _rows([3 * d for d in difficulty]), 2.0)}
    scales, factor = shrink_scales(per_layer)
    assert factor == pytest.approx(1.0)
    mean = sum(difficulty) / 4
    assert scales == pytest.approx({0: mean, 1: 10 * mean, 2: 1.5 * mean})


def test_shrinkage_needs_two_layers_and_two_samples():
    from casp.algorithms.shrinkage import shrink_layer_effects

    x = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    assert shrink_layer_effects(x[:1])[1] == 1.0 and shrink_layer_effects(x[:, :1])[1] == 1.0
    effects, factor = shrink_layer_effects(x)
    assert 0 <= factor <= 1 and effects.mean() == pytest.approx(x.mean(1).double().mean())


def test_the_probes_and_the_baseline_check_take_the_originals_log_probabilities_once(tiny_llama_dir, scene_text,
                                                                                   monkeypatch):
    import casp.steps.search as search_step

    calls = []
    real = search_step.reference_logprobs
    monkeypatch.setattr(search_step, "reference_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=2), progress=False)
    assert "layer_scales" in res.report and "allocation_kl" in res.report["baseline_check"]
    assert len(calls) == 1


def test_the_search_shares_the_originals_log_probabilities_too(tiny_llama_dir, scene_text, monkeypatch):
    import casp.steps.search as search_step

    calls = []
    real = search_step.reference_logprobs
    monkeypatch.setattr(search_step, "reference_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=2, search_steps=2, search_samples=2),
                   progress=False)
    assert "search" in res.report and "layer_scales" in res.report and "allocation_kl" in res.report["baseline_check"]
    assert len(calls) == 1


def _type_skewed_plan(tiny_llama_dir, scene_text, monkeypatch, factor, module="mlp.down_proj"):
    """The measured plan of a run whose estimate of every `module` (all layers) is multiplied by `factor`."""
    from casp.steps import measure

    honest = measure.measure_distortions

    def skewed(run, measured, layers, analysis):
        honest(run, measured, layers, analysis)
        for u in measured.units:
            if u.module == module and u.layer in layers:
                u.distortion = {k: v * factor for k, v in u.distortion.items()}

    monkeypatch.setattr(plan_step, "measure_distortions", skewed)
    seen = {}
    real = plan_step.plan_ranks_and_units
    monkeypatch.setattr("casp.pipeline.plan_ranks_and_units",
                        lambda run, batches, held=(): seen.setdefault("m", real(run, batches, held)))
    res = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=2, damage="measured-types"), progress=False)
    return seen["m"], res


def test_a_projection_type_misjudged_in_every_layer_is_undone_by_its_type_scale(tiny_llama_dir, scene_text,
                                                                                monkeypatch):
    """One projection type's estimate 100-fold off in every layer (the within-layer bias no layer scale can
    see): its type scale takes the factor back, and the damages the allocator weighs stay close to the honest
    run's, where a per-layer scale alone leaves that type 100-fold off against the others."""
    import casp.steps.layer_scales as scales_step

    monkeypatch.setattr(scales_step, "shrink_layer_effects", lambda x: (x.double().mean(1), 1.0))
    honest, _ = _type_skewed_plan(tiny_llama_dir, scene_text, monkeypatch, 1.0)
    skewed, res = _type_skewed_plan(tiny_llama_dir, scene_text, monkeypatch, 100.0)
    ratio = honest.type_scales["mlp.down_proj"] / skewed.type_scales["mlp.down_proj"]
    assert 50 < ratio < 200
    assert set(skewed.type_scales) == {u.module for u in skewed.units}
    worst = max(abs(math.log(v.distortion[k] / u.distortion[k])) for u, v in zip(honest.units, skewed.units)
                for k in u.distortion if u.distortion[k] > 0)
    assert worst < math.log(1.5)
    assert res.report["type_scales"] == skewed.type_scales
    assert res.report["type_scale_trust"]["3b-g128"] == 1.0


def test_each_layer_still_predicts_its_own_measured_kl_after_the_type_scales(tiny_llama_dir, scene_text,
                                                                            monkeypatch):
    """The layer scales are refitted on the type-scaled estimate: with full trust, a layer's scaled damages at
    the probe add up to the KL its probe measured (what the layer scales alone guaranteed before)."""
    import casp.steps.layer_scales as scales_step

    monkeypatch.setattr(scales_step, "shrink_layer_effects", lambda x: (x.double().mean(1), 1.0))
    kls = {}
    real = scales_step._kl_with

    def record(run, units, label, probes, held):
        rows = real(run, units, label, probes, held)
        if len({u.layer for u in units}) == 1 and len(units) > 1:
            kls[units[0].layer] = sum(t for t, _ in rows) / sum(c for _, c in rows)
        return rows

    monkeypatch.setattr(scales_step, "_kl_with", record)
    measured, res = _type_skewed_plan(tiny_llama_dir, scene_text, monkeypatch, 30.0)
    for layer, kl in kls.items():
        scaled = sum(u.distortion["3b-g128"] for u in measured.units if u.layer == layer)
        assert scaled == pytest.approx(kl, rel=1e-6)
    from casp.report import render_markdown

    assert "by projection type" in render_markdown(res.report, [])


def test_the_default_measured_damage_scales_per_layer_only(tiny_llama_dir, scene_text):
    res = compress(tiny_llama_dir, None, _cfg(scene_text, check_samples=2), progress=False)
    assert res.recipe.damage == "measured" and res.report["layer_scales"]
    assert res.report["type_scales"] == {} and res.report["type_scale_trust"] == {}
