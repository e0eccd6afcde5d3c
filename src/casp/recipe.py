"""The recipe: one frozen, fully resolved description of a compression run, and `resolve`, which makes it.

Every default that depends on the target, the model or the calibration source is settled here, once,
with the reason it was chosen. A run writes its recipe verbatim to `OUT/recipe.json` and
`report["recipe"]`; `casp compress --recipe OUT/recipe.json MODEL -o OUT2` runs the same recipe again.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from casp.config import FISHER_TOKENS, CompressionConfig
from casp.errors import CaspError

RECIPE_VERSION = 1
STAND_IN_TEXT = "stand-in-text"
TUNING = ("finetune_steps", "finetune_lr", "finetune_within", "e2e_steps", "e2e_lr")   # fine-tuning, after the plan


@dataclass(frozen=True)
class Recipe:
    """What a run does, every option spelled out. Fields mirror `CompressionConfig`, resolved."""

    bits: float
    quantizer: str
    quantizer_options: dict
    transform: str | None
    transform_options: dict
    qk_rank: float | str
    qk_rank_overrides: dict
    qk_rank_ladder: tuple[float, ...]
    allocation: str
    granularity: str
    fisher: str                      # labels of the sensitivity pass: "empirical" or "sampled"
    fisher_tokens: int               # calibration tokens of the sensitivity pass
    damage: str                      # what rd weighs settings by: "measured" (scaled per layer), "measured-types", "estimate"
    search_steps: int
    search_samples: int
    check_samples: int               # held out for the baseline check (0: none)
    check_inputs: str                # the check's uniform layers calibrated on "auto", "shared" or "own" inputs
    calib_samples: int
    calib_seq_len: int
    calib_jsonl: str | None
    calib_text: str | None
    calibration_source: str          # "jsonl", "text", "built-in text" or "the model's own data"
    preset: str                      # named defaults for the calibration source ("none", "stand-in-text")
    excluded_candidates: tuple[str, ...]
    density_mass: float
    seed: int
    device: str
    layers: tuple[int, ...] | None
    stream: bool
    max_memory: float | None
    finetune_steps: int              # Adam steps per decoder layer on its output (0: off)
    finetune_lr: float
    finetune_within: bool            # also tune after each input group of a layer is quantized
    e2e_steps: int                   # Adam steps on the whole model against the original's distribution (0: off)
    e2e_lr: float
    reasons: dict = field(default_factory=dict)    # field -> why it has this value (absent: the user gave it)
    version: int = RECIPE_VERSION

    def build_quantizer(self):
        """The quantizer with every option of the recipe, or None for "none" (fp16 storage)."""
        if self.quantizer == "none":
            return None
        from casp.quant.base import get_quantizer_class

        cls = get_quantizer_class(self.quantizer)
        return cls.from_options(_from_json_values(cls.Config, self.quantizer_options))

    def build_transform(self):
        """The weight transform of the recipe, or None."""
        if self.transform is None:
            return None
        from casp.transforms.base import get_transform_class

        cls = get_transform_class(self.transform)
        return cls.from_options(_from_json_values(cls.Config, self.transform_options))

    def to_dict(self) -> dict:
        """Plain JSON data (tuples as lists, integer keys as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """The text of OUT/recipe.json for this recipe."""
        from casp.report import recipe_json

        return recipe_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        optional = {"reasons", "version", "check_samples", "check_inputs", "fisher", "fisher_tokens", "damage", *TUNING}
        missing = sorted(known - set(data) - optional)
        unknown = sorted(set(data) - known)
        if missing or unknown:
            raise CaspError(f"not a casp recipe: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
        if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
            raise CaspError(f"recipe version {data['version']} is not {RECIPE_VERSION}; re-run resolve with this casp")
        # recipes written before the baseline check, the Fisher choice and length, measured damage and fine-tuning
        # ran without them (and with 16,384 sensitivity tokens)
        untuned = CompressionConfig()
        values = {"check_samples": 0, "check_inputs": "own", "fisher": "empirical", "fisher_tokens": FISHER_TOKENS,
                  "damage": "estimate", **{k: getattr(untuned, k) for k in TUNING}, **data}
        aqlm = dict(values["quantizer_options"])   # --finetune-steps was an AQLM option before it applied to all
        if "layer_finetune_steps" in aqlm:
            values["finetune_steps"] = aqlm.pop("layer_finetune_steps")
            values["quantizer_options"] = aqlm
        values["qk_rank_overrides"] = {int(k): v for k, v in data["qk_rank_overrides"].items()}
        values["qk_rank_ladder"] = tuple(data["qk_rank_ladder"])
        values["excluded_candidates"] = tuple(data["excluded_candidates"])
        values["layers"] = tuple(data["layers"]) if data["layers"] is not None else None
        recipe = cls(**values)
        recipe.check()
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise CaspError(f"cannot read recipe {str(path)!r}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise CaspError(f"recipe {str(path)!r} is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise CaspError(f"recipe {str(path)!r} is not a JSON object")
        return cls.from_dict(data)

    def to_config(self) -> CompressionConfig:
        """The config that asks for exactly this recipe (every option given)."""
        names = {f.name for f in dataclasses.fields(CompressionConfig)}
        values = {k: getattr(self, k) for k in names if hasattr(self, k)}
        values["quantizer_options"] = dict(self.quantizer_options)
        values["transform_options"] = dict(self.transform_options)
        return CompressionConfig(**values)

    def check(self) -> None:
        """The recipe's options are valid and its quantizer and transform can be built."""
        self.to_config().check()
        _built(self.build_quantizer)
        _built(self.build_transform)

    def measurement_key(self) -> str:
        """What the measured plan (ranks, units, damages) depends on: every field but the target and the rule
        that spends it. Runs with the same key share a plan cache entry."""
        d = self.to_dict()
        for k in ("bits", "allocation", "granularity", "search_steps", "reasons", "stream", "max_memory", "device",
                  "check_inputs", *TUNING):
            d.pop(k)
        if self.transform:
            from casp.transforms.base import get_transform_class

            d["transform"] = _built(lambda: get_transform_class(self.transform)).measures_as or self.transform
        d["measures"] = self.allocation == "rd" and self.quantizer != "none"
        d["search"] = self.search_steps > 0
        return json.dumps(d, sort_keys=True)


def _built(build):
    try:
        return build()
    except KeyError as e:
        raise CaspError(str(e).strip("'\"")) from None
    except (TypeError, ValueError) as e:
        raise CaspError(str(e)) from None


def _from_json_values(config_cls, options: dict) -> dict:
    """Options read back from JSON: lists become tuples and names become torch dtypes where the option's
    default is one."""
    import torch

    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}

    def back(k, v):
        if isinstance(v, list) and isinstance(defaults.get(k), tuple):
            return tuple(v)
        if isinstance(v, str) and isinstance(defaults.get(k), torch.dtype):
            return getattr(torch, v.removeprefix("torch."))
        return v

    return {k: back(k, v) for k, v in options.items()}


def _jsonable(value):
    """JSON data of options (a torch dtype as its name)."""
    return json.loads(json.dumps(value, default=str))


def resolve(config: CompressionConfig | None, model, *, out=None, resume: bool = False) -> Recipe:
    """Settle every option of a run: pure (the config is never changed), one place for every default.

    `model` is what `casp.compress` got (a directory, a built-in name, None or a model in memory);
    `out` and `resume` matter only to whether the run streams.
    """
    config = config or CompressionConfig()
    config.check()
    reasons: dict[str, str] = {}
    quantizer_name = config.quantizer
    qk_rank = _qk_rank(config, reasons)
    from casp.io.modelio import model_source

    path = model_source(model)
    source = _calibration_source(config, path)
    preset = _preset(config, source, reasons)
    quantizer_options, excluded = _quantizer_options(config, path, preset, reasons)
    transform_options = _transform_options(config)
    stream = _stream(config, model, out, resume, reasons)
    if config.search_steps and (config.allocation != "rd" or quantizer_name == "none"
                                or qk_rank not in (0, 0.0, "joint") or config.qk_rank_overrides):
        raise CaspError("--search-steps searches the rd allocation of whole matrices: it needs --allocation rd, "
                        "a quantizer, and --qk-rank 0 or joint")
    if stream and config.e2e_steps:
        raise CaspError("--e2e-steps trains the whole compressed model in memory; it cannot run with --stream")
    if stream and config.search_steps:
        raise CaspError("--search-steps measures KL on the whole model in memory; it cannot run with --stream")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(CompressionConfig)}
    values.update(check_samples=_check_samples(config, stream, reasons))
    values.update(damage=_damage(config, values["check_samples"], reasons))
    values.update(fisher_tokens=_fisher_tokens(config, reasons))
    values.update(qk_rank=qk_rank, quantizer_options=quantizer_options, transform_options=transform_options,
                  qk_rank_overrides=dict(config.qk_rank_overrides), qk_rank_ladder=tuple(config.qk_rank_ladder),
                  layers=tuple(config.layers) if config.layers is not None else None, stream=stream,
                  calibration_source=source, preset=preset, excluded_candidates=excluded,
                  reasons=dict(sorted(reasons.items())))
    recipe = Recipe(**values)
    return Recipe.from_dict(recipe.to_dict())   # exactly what recipe.json will read back


# An allocated run holds out at most one calibration sample in this many for its baseline check.
CHECK_SHARE = 8


def _check_samples(config: CompressionConfig, stream: bool, reasons: dict) -> int:
    """Samples held out to check the allocation against uniform (`casp.steps.baseline_check`); 0 when not run."""
    if not config.check_samples or config.allocation == "uniform" or config.quantizer == "none":
        return 0
    if stream:
        reasons["check_samples"] = "a streamed run never holds the whole model, which the baseline check measures"
        return 0
    n = min(config.check_samples, config.calib_samples // CHECK_SHARE)
    if n < config.check_samples:
        reasons["check_samples"] = (f"at most one calibration sample in {CHECK_SHARE} is held out for the baseline "
                                    "check" + ("" if n else ": too few to check"))
    return n


def _fisher_tokens(config: CompressionConfig, reasons: dict) -> int:
    """The sensitivity pass's tokens: the user's, the quantizer's (`Quantizer.sensitivity_tokens`), or the default.

    Only an rd allocation runs the pass, so other runs keep the default without a reason."""
    if config.fisher_tokens is not None or config.quantizer == "none" or config.allocation != "rd":
        return config.fisher_tokens or FISHER_TOKENS
    from casp.quant.base import get_quantizer_class

    asked = get_quantizer_class(config.quantizer).sensitivity_tokens(config.transform)
    if asked is None:
        return FISHER_TOKENS
    tokens, why = asked
    reasons["fisher_tokens"] = why
    return tokens


def _damage(config: CompressionConfig, check_samples: int, reasons: dict) -> str:
    """Measured damage needs the held-out samples (those of the baseline check) and an rd allocation."""
    if config.damage == "estimate" or config.allocation != "rd" or config.quantizer == "none":
        return config.damage
    if not check_samples and not config.search_steps:
        reasons["damage"] = ("no held-out samples to measure each layer's KL on (the baseline check's): the "
                             "estimate alone")
        return "estimate"
    return config.damage


def _qk_rank(config: CompressionConfig, reasons: dict):
    if config.qk_rank is not None:
        return config.qk_rank
    if config.allocation == "rd" and config.quantizer != "none":
        reasons["qk_rank"] = "rd allocation with a quantizer: ranks are chosen with the bits (joint)"
        return "joint"
    if config.allocation == "paper" or config.quantizer == "none":
        reasons["qk_rank"] = "the paper's ratio, with --allocation paper or --quantizer none"
        return 0.25
    reasons["qk_rank"] = "uniform allocation keeps W_q / W_k dense"
    return 0.0


def _calibration_source(config: CompressionConfig, path: Path | None) -> str:
    from casp.data.calibration import uses_builtin_text

    if config.calib_jsonl:
        return "jsonl"
    if config.calib_text:
        return "text"
    return "built-in text" if path is not None and uses_builtin_text(path) else "the model's own data"


def _preset(config: CompressionConfig, source: str, reasons: dict) -> str:
    """No preset unless asked for: the stand-in-text shrink helps one real model and hurts another."""
    if config.preset is not None:
        return config.preset
    if source == "built-in text":
        reasons["preset"] = ("no preset by default: on casp's built-in text, stand-in-text's XᵀX shrink made 3-bit "
                             "GPTQ 21-31 % better on SmolLM2-135M and 50-66 % worse on Gemma-3-270M "
                             "(docs/allocation.md, 'GPTQ on a stand-in calibration text'); ask for it with "
                             "--preset stand-in-text")
    else:
        reasons["preset"] = f"calibration on {source}: no preset"
    return "none"


def _quantizer_options(config: CompressionConfig, path: Path | None, preset: str, reasons: dict):
    """Every option of the quantizer (target- and preset-dependent defaults settled) and the left-out candidates."""
    if config.quantizer == "none":
        if config.quantizer_options:
            raise CaspError(f"quantizer options {sorted(config.quantizer_options)} need a quantizer, not 'none'")
        return {}, ()
    from casp.quant.base import available_quantizers, get_quantizer_class

    try:
        cls = get_quantizer_class(config.quantizer)
    except KeyError:
        raise CaspError(f"unknown --quantizer {config.quantizer!r}; choose from none, "
                        f"{', '.join(available_quantizers())}") from None
    given = dict(config.quantizer_options)
    options = {}
    for k, v in cls.target_options(config.bits).items():
        options[k] = v
        reasons[f"quantizer_options.{k}"] = f"{config.quantizer}'s default for a {config.bits}-bit target"
    for k, v in cls.transform_options(config.transform).items():
        options[k] = v
        reasons[f"quantizer_options.{k}"] = f"{config.quantizer}'s default under --transform {config.transform}"
    if preset == STAND_IN_TEXT:
        for k, v in cls.stand_in_text_options().items():
            options[k] = v
            reasons[f"quantizer_options.{k}"] = f"preset {STAND_IN_TEXT}"
    for k in given:
        reasons.pop(f"quantizer_options.{k}", None)
    quantizer = _built(lambda: cls.from_options({**options, **given}))
    full = _jsonable(dataclasses.asdict(quantizer.config))
    return full, _excluded(config, quantizer, path, reasons)


def _excluded(config: CompressionConfig, quantizer, path: Path | None, reasons: dict) -> tuple[str, ...]:
    """Candidates that reproduce a grid some of the model's weights already lie on (they would measure no error)."""
    from casp.models.source_grids import detect_source_grids, grid_counts

    if path is None or config.allocation == "uniform":
        return ()
    grids = detect_source_grids(path)
    found = sorted(set(grids.values()))
    dropped = tuple(s.label() for s in quantizer.candidates() if any(quantizer.reproduces_grid(s, g) for g in found))
    if dropped:
        counts = ", ".join(f"{n} on {label}" for label, n in sorted(grid_counts(grids).items()))
        reasons["excluded_candidates"] = (f"{len(grids)} weight matrices already lie on a quantization grid ({counts}); "
                                          "these settings reproduce one and would measure almost no error")
    return dropped


def _transform_options(config: CompressionConfig) -> dict:
    if config.transform is None:
        if config.transform_options:
            raise CaspError(f"transform options {sorted(config.transform_options)} need --transform")
        return {}
    from casp.transforms.base import get_transform_class

    cls = _built(lambda: get_transform_class(config.transform))
    return _jsonable(dataclasses.asdict(_built(lambda: cls.from_options(config.transform_options)).config))


def _stream(config: CompressionConfig, model, out, resume: bool, reasons: dict) -> bool:
    from torch import nn

    if config.stream:
        return True
    if resume or config.max_memory is not None:
        reasons["stream"] = "--resume and --max-memory continue or bound a streamed run"
        return True
    if out is None or isinstance(model, nn.Module) or config.search_steps or not _too_big(model):
        return False
    reasons["stream"] = "the model's float32 weights exceed half the available memory"
    return True


def _too_big(model) -> bool:
    from casp.io.modelio import is_compressed, resolve_model_path
    from casp.models.streaming import too_big_for_memory

    path = resolve_model_path(model)
    try:
        return not is_compressed(path) and any(path.glob("*.safetensors")) and too_big_for_memory(path)
    except CaspError:
        return False   # an unreadable checkpoint is reported by the loader, with its own message
