"""Candidate measurement: the row sample that estimates a large matrix's damage."""
import pytest
import torch

from casp.algorithms.distortion import weighted_distortion
from casp.codec import Codec
from casp.quant import GPTQ, QuantSpec, get_quantizer_class
from casp.steps import measure
from casp.steps.measure import Target
from casp.steps.units import Role, Unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(out_f=48, in_f=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, in_f, generator=g) * torch.rand(in_f, generator=g)
    return torch.randn(out_f, in_f, generator=g), x.T @ x, torch.rand(out_f, generator=g) + 0.1


def _unit(out_f, in_f, name="mlp.up_proj"):
    return Unit(0, name, Role.DENSE, "mlp_in", out_f, in_f, 0, False)


SETTINGS = [QuantSpec(2, 16), QuantSpec(3, -1)]


def test_small_matrices_and_exact_requests_measure_every_row(monkeypatch):
    w, h, f = _problem()
    q = GPTQ()
    whole = {s.label(): weighted_distortion(q.quantize(w, h, s)[1] - w, h, f) for s in SETTINGS}
    assert measure.unit_distortions(Codec(q), _unit(48, 32), Target(w, h, f), SETTINGS)[0] == pytest.approx(whole, rel=1e-12)
    monkeypatch.setattr(measure, "MEASURE_ROWS", 8)
    assert measure.unit_distortions(Codec(q), _unit(48, 32), Target(w, h, f), SETTINGS, exact=True)[0] == pytest.approx(whole, rel=1e-12)
    sampled = measure.unit_distortions(Codec(q), _unit(48, 32), Target(w, h, f), SETTINGS)[0]
    assert sampled != pytest.approx(whole, rel=1e-6)


def test_a_row_sample_is_the_scaled_damage_of_those_rows(monkeypatch):
    monkeypatch.setattr(measure, "MEASURE_ROWS", 8)
    w, h, f = _problem()
    q, u = GPTQ(), _unit(48, 32)
    rows = measure.measured_rows(u, 48, Codec(q), exact=False, seed=0)
    assert rows.numel() == 8 and torch.equal(rows, measure.measured_rows(u, 48, Codec(q), exact=False, seed=0))
    values, quantized = measure.unit_distortions(Codec(q), u, Target(w, h, f), SETTINGS)
    assert quantized == []
    for s in SETTINGS:
        wq = q.quantize(w[rows], h, s)[1]
        assert values[s.label()] == pytest.approx(6 * weighted_distortion(wq - w[rows], h, f[rows]), rel=1e-12)


def test_the_row_sample_estimates_the_damage_without_bias(monkeypatch):
    monkeypatch.setattr(measure, "MEASURE_ROWS", 12)
    w, h, f = _problem(out_f=64)
    q, s = get_quantizer_class("rtn")(), QuantSpec(2, 16)
    exact = measure.unit_distortions(Codec(q), _unit(64, 32), Target(w, h, f), [s], exact=True)[0][s.label()]
    draws = [measure.unit_distortions(Codec(q), _unit(64, 32), Target(w, h, f), [s], seed=seed)[0][s.label()] for seed in range(200)]
    assert sum(draws) / len(draws) == pytest.approx(exact, rel=0.05)


def test_quantizers_whose_rows_interact_are_measured_whole(monkeypatch):
    monkeypatch.setattr(measure, "MEASURE_ROWS", 8)
    aqlm = get_quantizer_class("aqlm")()
    assert not aqlm.rows_independent
    assert measure.measured_rows(_unit(48, 32), 48, Codec(aqlm), exact=False, seed=0) is None


def test_e8_codes_a_row_sample_as_in_the_whole_matrix():
    """Given the whole matrix's RMS (its row context), BlockLDLQ codes each sampled row as in the whole matrix."""
    from casp.quant.e8 import E8Setting

    w, h, _ = _problem(out_f=40, in_f=32)
    h[5, :] = h[:, 5] = 0   # a dead input: its column is zeroed before the RMS, in the whole and in the sample
    e8 = get_quantizer_class("e8")(scale_multipliers=(1.0,))
    rows = torch.tensor([1, 7, 8, 30])
    for bits in (2, 3, 4):
        whole = e8.quantize(w, h, E8Setting(bits))[1]
        sample = e8.dequantize_many(w[rows], h, [E8Setting(bits)], e8.row_context(w, h))[0]
        torch.testing.assert_close(sample, whole[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("transform", [None, "incoherence"])
def test_e8_row_samples_estimate_the_whole_damage(transform):
    """The scaled damage of random row samples averages to the whole matrix's Fisher-weighted damage, in the
    quantizer's basis too (the rows of U W Vᵀ, weighted by diag(U diag(F) Uᵀ))."""
    from casp.quant.e8 import E8Setting
    from casp.transforms import get_transform_class

    w, h, f = _problem(out_f=64, in_f=32, seed=4)
    f = f ** 3
    codec = Codec(get_quantizer_class("e8")(), get_transform_class(transform)() if transform else None)
    settings = [E8Setting(2), E8Setting(3)]
    whole = [weighted_distortion(d - w, h, f) for d in codec.dequantize_many(w, h, settings, seed=5)]
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([codec.sampled_damages(Target(w, h, f), settings, 5, torch.randperm(64, generator=g)[:16])
                          for _ in range(60)])
    mean = draws.mean(0)
    for k in range(len(settings)):
        assert float(mean[k]) == pytest.approx(whole[k], rel=0.1)
    assert float(mean[0]) > 2 * float(mean[1])


def test_a_probed_matrix_is_measured_at_its_probe_on_the_whole_probe_weight(tiny_llama_dir, scene_text, monkeypatch):
    """Where a matrix's damages come from a row sample, its probe setting is not coded on the sample: the damage at
    the probe is that of the whole weight the probe puts into the model."""
    import casp.steps.layer_scales as scales_step
    from casp.config import CompressionConfig
    from casp.pipeline import compress

    monkeypatch.setattr(measure, "MEASURE_ROWS", 8)
    swept, seen = [], {}
    real_sampled = Codec.sampled_damages

    def sampled(self, target, settings, seed, rows):
        swept.append([s.label() for s in settings])
        return real_sampled(self, target, settings, seed, rows)

    def scales(run, measured, held):
        seen["raw"] = {u.key: dict(u.distortion) for u in measured.units}
        seen["probes"], seen["units"] = dict(measured.probes), list(measured.units)
        seen["run"] = run
        return {}

    real_probe = measure._probe_weights
    targets = {}

    def probe_weights(run, unit, target, probes):
        coded = real_probe(run, unit, target, probes)
        targets[unit.key] = (target, coded)
        return coded

    monkeypatch.setattr(Codec, "sampled_damages", sampled)
    monkeypatch.setattr(measure, "_probe_weights", probe_weights)
    monkeypatch.setattr(scales_step, "measure_layer_scales", scales)
    monkeypatch.setattr("casp.steps.plan.measure_layer_scales", scales)
    cfg = CompressionConfig(bits=3.25, qk_rank=0, calib_samples=16, calib_seq_len=32, calib_text=str(scene_text),
                            check_samples=2, check_inputs="own")
    compress(tiny_llama_dir, None, cfg, progress=False)
    probe = measure.probe_settings(seen["run"].codec)[0].label()
    assert swept and all(probe not in labels and len(labels) > 1 for labels in swept)
    probed = [u for u in seen["units"] if measure.is_probed(u)]
    assert {(u.key, probe) for u in probed} <= set(seen["probes"])
    assert any(u.out_features > 8 for u in probed)
    assert {u.key for u in probed if u.out_features > 8} == set(targets)
    for key, (target, coded) in targets.items():
        whole = weighted_distortion(coded[probe] - target.w.float(), target.xtx, target.fisher)
        assert seen["raw"][key][probe] == pytest.approx(whole, rel=1e-9)
        assert torch.equal(seen["probes"][(key, probe)], coded[probe].half())


def test_e8_damages_are_the_whole_probe_times_ratios_on_a_small_sample_and_the_sweep_hints_the_layer_pass(
        tiny_llama_dir, scene_text, monkeypatch):
    """Under `Quantizer.ratio_rows`, every setting of a probed matrix is swept on that many rows (the probe's
    included) and its damage is the whole probe weight's times its ratio to the probe on those rows. The sweep's
    multipliers become the units' hints, and the layer pass codes each matrix once with its hint."""
    import casp.steps.layer_scales as scales_step
    from casp.config import CompressionConfig
    from casp.pipeline import compress
    from casp.quant.e8 import E8Quantizer

    samples, seen, chosen = [], {}, []
    real_sampled = Codec.sampled_damages

    def sampled(self, target, settings, seed, rows, hints=None):
        out = real_sampled(self, target, settings, seed, rows, hints)
        samples.append((target, rows.numel(), dict(zip([s.label() for s in settings], out))))
        return out

    real_probe = measure._probe_weights

    def probe_weights(run, unit, target, probes):
        coded = real_probe(run, unit, target, probes)
        seen[unit.key] = (target, {k: weighted_distortion(v - target.w.float(), target.xtx, target.fisher)
                                       for k, v in coded.items()})
        return coded

    def scales(run, measured, held):
        seen["units"] = {u.key: u for u in measured.units}
        return {}

    real_choice = E8Quantizer._scale_choice
    monkeypatch.setattr(E8Quantizer, "_scale_choice", lambda self, *a: chosen.append(1) or real_choice(self, *a))
    monkeypatch.setattr(Codec, "sampled_damages", sampled)
    monkeypatch.setattr(measure, "_probe_weights", probe_weights)
    monkeypatch.setattr(scales_step, "measure_layer_scales", scales)
    monkeypatch.setattr("casp.steps.plan.measure_layer_scales", scales)
    cfg = CompressionConfig(quantizer="e8", quantizer_options={"ratio_rows": 8}, bits=3.25, qk_rank=0,
                            calib_samples=16, calib_seq_len=32, calib_text=str(scene_text), check_samples=2,
                            check_inputs="own")
    result = compress(tiny_llama_dir, None, cfg, progress=False)
    units = seen.pop("units")
    assert seen and not chosen   # every matrix was probed on a sample, and no scale was searched again
    for key, (target, at_probe) in seen.items():
        (probe, level), = at_probe.items()
        (rows, sample), = [(n, d) for t, n, d in samples if t is target]
        assert rows == 8 and probe in sample
        damage = units[key].distortion
        assert damage[probe] == pytest.approx(level, rel=1e-12)
        for label, d in sample.items():
            assert damage[label] == pytest.approx(level * d / sample[probe], rel=1e-9)
        assert set(units[key].hints) == set(sample)
    stored = result.report["layers"]
    assert stored and all(row["setting"].startswith("e8p") for row in stored)
