"""The recipe: resolved once, never mutating the caller's config, written verbatim, and enough to rerun a run."""
import dataclasses
import filecmp
import json

import pytest

from casp.cli import main
from casp.config import CompressionConfig
from casp.errors import CaspError
from casp.recipe import Recipe, resolve

CALIB = ("--calib-samples", "4", "--calib-seq-len", "32")
MEASUREMENT_FREE = {"bits", "allocation", "granularity", "search_steps", "reasons", "stream", "max_memory", "device",
                    "finetune_steps", "finetune_lr", "finetune_within", "e2e_steps", "e2e_lr", "check_inputs"}


def _outputs_equal(a, b):
    """Every file of two output directories is byte-identical, but the report's timings."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if not name.startswith("report."):
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["recipe"] == rb["recipe"] == json.loads((a / "recipe.json").read_text())


def test_resolve_never_changes_the_callers_config(tiny_llama_dir):
    cfg = CompressionConfig(bits=3.0)
    before = dataclasses.asdict(cfg)
    recipe = resolve(cfg, tiny_llama_dir, out="x")
    assert dataclasses.asdict(cfg) == before and cfg.qk_rank is None
    assert recipe.qk_rank == "joint" and "qk_rank" in recipe.reasons


def test_every_config_field_is_in_the_recipe_and_the_recipe_reads_back():
    assert {f.name for f in dataclasses.fields(CompressionConfig)} <= {f.name for f in dataclasses.fields(Recipe)}
    recipe = resolve(CompressionConfig(bits=2.5, quantizer="e8", transform="incoherence"), None)
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert recipe.quantizer_options["candidate_bits"] == [2, 3, 4]     # the target's ladder, stated
    assert "quantizer_options.candidate_bits" in recipe.reasons
    assert recipe.transform == "incoherence" and recipe.build_transform() is not None


def test_e8_under_incoherence_starts_its_scale_grid_at_the_nominal_scale():
    """A transform-dependent default is stated in the reasons, and the user's own grid wins over it."""
    rotated = resolve(CompressionConfig(bits=3.25, quantizer="e8", transform="incoherence"), None)
    assert rotated.quantizer_options["scale_multipliers"] == [1.0, 1.1, 1.2]
    assert "--transform incoherence" in rotated.reasons["quantizer_options.scale_multipliers"]
    plain = resolve(CompressionConfig(bits=3.25, quantizer="e8"), None)
    assert plain.quantizer_options["scale_multipliers"] == [0.9, 1.0, 1.1, 1.2]
    assert "quantizer_options.scale_multipliers" not in plain.reasons
    given = resolve(CompressionConfig(bits=3.25, quantizer="e8", transform="incoherence",
                                      quantizer_options={"scale_multipliers": (0.8, 1.0)}), None)
    assert given.quantizer_options["scale_multipliers"] == [0.8, 1.0]
    assert "quantizer_options.scale_multipliers" not in given.reasons


def test_e8_under_incoherence_halves_the_sensitivity_pass_and_says_why():
    """A quantizer's own sensitivity-pass length is stated in the reasons; others keep the default; the user's wins."""
    rotated = resolve(CompressionConfig(bits=3.25, quantizer="e8", transform="incoherence"), None)
    assert rotated.fisher_tokens == 8192 and "E8 under incoherence" in rotated.reasons["fisher_tokens"]
    for cfg in (CompressionConfig(bits=3.25), CompressionConfig(bits=3.25, quantizer="e8"),
                CompressionConfig(bits=3, quantizer="e8", transform="incoherence", allocation="uniform")):
        recipe = resolve(cfg, None)
        assert recipe.fisher_tokens == 16384 and "fisher_tokens" not in recipe.reasons
    given = resolve(CompressionConfig(bits=3.25, quantizer="e8", transform="incoherence", fisher_tokens=2048), None)
    assert given.fisher_tokens == 2048 and "fisher_tokens" not in given.reasons
    older = {k: v for k, v in rotated.to_dict().items() if k != "fisher_tokens"}
    assert Recipe.from_dict(older).fisher_tokens == 16384    # recipes written before the field ran with 16,384
    with pytest.raises(CaspError, match="--fisher-tokens must be >= 1"):
        resolve(CompressionConfig(fisher_tokens=0), None)


def test_a_recipe_resolves_to_itself():
    """The config a recipe gives resolves to the same recipe (only the reasons, now all given, go)."""
    recipe = resolve(CompressionConfig(bits=3.25, quantizer="gptq"), None)
    again = resolve(recipe.to_config(), None)
    assert dataclasses.replace(again, reasons={}) == dataclasses.replace(recipe, reasons={})


def test_every_field_that_can_change_measurement_is_in_the_plan_cache_key():
    """A new recipe field joins the plan-cache key unless it is declared measurement-free here."""
    recipe = resolve(CompressionConfig(bits=3.0), None)
    changed = {"bits": 4.0, "quantizer": "rtn", "quantizer_options": {"damp": 0.5}, "transform": "incoherence",
               "transform_options": {"x": 1}, "qk_rank": 0.25, "qk_rank_overrides": {0: 0.5},
               "qk_rank_ladder": (0.5,), "allocation": "paper", "granularity": "matrix", "fisher": "sampled", "damage": "estimate",
               "fisher_tokens": 512, "search_steps": 3,
               "search_samples": 4, "check_samples": 2, "check_inputs": "shared", "calib_samples": 3, "calib_seq_len": 64, "calib_jsonl": "a.jsonl",
               "calib_text": "t.txt", "calibration_source": "text", "preset": "stand-in-text",
               "excluded_candidates": ("4b-g32",), "density_mass": 0.5, "seed": 1, "device": "cuda",
               "layers": (0,), "stream": True, "max_memory": 1.0, "finetune_steps": 5, "finetune_lr": 0.1,
               "finetune_within": True,
               "e2e_steps": 5, "e2e_lr": 0.1, "reasons": {"a": "b"}, "version": 2}
    assert set(changed) == {f.name for f in dataclasses.fields(Recipe)}
    for name, value in changed.items():
        other = dataclasses.replace(recipe, **{name: value})
        assert other.to_json() != recipe.to_json(), name
        if name not in MEASUREMENT_FREE:
            assert other.measurement_key() != recipe.measurement_key(), name


def test_compress_with_its_recipe_reproduces_the_run_byte_for_byte(tmp_path, tiny_llama_dir, scene_text):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["compress", str(tiny_llama_dir), "-o", str(first), "--bits", "3", "--calib-text", str(scene_text),
                 *CALIB, "--seed", "3", "--quiet"]) == 0
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["seed"] == 3 and recipe["qk_rank"] == "joint" and recipe["quantizer_options"]["damp"] == 0.01
    assert main(["compress", str(tiny_llama_dir), "-o", str(second), "--recipe", str(first / "recipe.json"),
                 "--quiet"]) == 0
    _outputs_equal(first, second)


def test_a_streamed_run_is_reproduced_by_its_recipe(tmp_path, tiny_llava_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["compress", str(tiny_llava_dir), "-o", str(first), "--bits", "3", "--stream", *CALIB,
                 "--quiet"]) == 0
    assert json.loads((first / "recipe.json").read_text())["stream"] is True
    assert main(["compress", str(tiny_llava_dir), "-o", str(second), "--recipe", str(first / "recipe.json"),
                 "--quiet"]) == 0
    _outputs_equal(first, second)


def test_flags_beside_a_recipe_override_it(tmp_path, tiny_llama_dir, scene_text):
    first = tmp_path / "a"
    assert main(["compress", str(tiny_llama_dir), "-o", str(first), "--bits", "3", "--allocation", "uniform",
                 "--calib-text", str(scene_text), *CALIB, "--quiet"]) == 0
    from casp.cli import build_parser, compression_request

    args = build_parser().parse_args(["compress", "-o", "x", "--recipe", str(first / "recipe.json"), "--bits", "4",
                                      "--damp", "0.1"])
    cfg = compression_request(args)
    assert isinstance(cfg, CompressionConfig) and cfg.bits == 4 and cfg.quantizer_options["damp"] == 0.1
    assert cfg.calib_text == str(scene_text) and cfg.allocation == "uniform"
    verbatim = compression_request(build_parser().parse_args(["compress", "-o", "x", "--recipe",
                                                              str(first / "recipe.json")]))
    assert verbatim == Recipe.load(first / "recipe.json")


def test_a_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"bits": 2}))
    with pytest.raises(CaspError, match="not a casp recipe"):
        Recipe.load(bad)
    with pytest.raises(CaspError, match="cannot read recipe"):
        Recipe.load(tmp_path / "missing.json")
    recipe = resolve(CompressionConfig(), None).to_dict()
    recipe["quantizer_options"]["damp"] = -1
    bad.write_text(json.dumps(recipe))
    with pytest.raises(CaspError, match="damp"):
        Recipe.load(bad)
