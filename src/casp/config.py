"""CompressionConfig: what the user asked for, as plain data; `casp.recipe.resolve` settles the rest.

Every field that has a CLI flag declares it in its metadata (flag, help, and how to parse it); the
`casp compress` flags are generated from here, so each default and each check is written once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from casp.errors import CaspError

QK_RANK_WORDS = ("auto", "joint")
ALLOCATIONS = ("rd", "paper", "uniform")
GRANULARITIES = ("matrix", "layer")
FISHER_LABELS = ("empirical", "sampled")
FISHER_TOKENS = 16384   # calibration tokens of the sensitivity pass unless the quantizer asks for fewer
DAMAGES = ("measured", "measured-types", "estimate")
CHECK_INPUTS = ("auto", "shared", "own")


def parse_qk_rank(text: str) -> float | str:
    """A `--qk-rank` value: 'auto', 'joint' or a number (its range is checked by `check`)."""
    if text in QK_RANK_WORDS:
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a ratio in [0, 1], 'auto' or 'joint', got {text!r}") from None


def parse_layer_ratio(text: str) -> tuple[int, float]:
    """A `--qk-rank-layer` value LAYER=RATIO."""
    try:
        layer, ratio = text.split("=")
        return int(layer), float(ratio)
    except ValueError:
        raise ValueError(f"expected LAYER=RATIO, got {text!r}") from None


def parse_ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def parse_floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers."""
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def option(default, flag: str | None, help: str, **how):
    """A config field; `flag` (None: Python only) and `how` (type, action, choices, ...) make its CLI flag."""
    meta = {"help": help, **how} if flag is None else {"flag": flag, "help": help, **how}
    if isinstance(default, (dict, list)):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CompressionConfig:
    """Options of `casp.compress`; the fields with a flag are the `casp compress` flags."""

    bits: float = option(2.0, "--bits", "target average bits per original weight", type=float)
    quantizer: str = option("gptq", "--quantizer", "a registered quantizer (gptq, rtn, e8, aqlm, ...) or none")
    quantizer_options: dict = option({}, None, "the quantizer's own options (their flags come from the quantizer)")
    transform: str | None = option(None, "--transform", "a registered weight transform applied before quantizing")
    transform_options: dict = option({}, None, "the transform's own options")
    qk_rank: float | str | None = option(
        None, "--qk-rank", "'joint': W_q/W_k rank (dense, 1/2, 1/4, 1/8) chosen with the bits under one budget; a "
        "ratio fixes the fraction of W_q/W_k parameters kept (0 disables); 'auto' spreads a 0.25 budget by spectra. "
        "Unset: joint with rd allocation, 0.25 with --allocation paper or --quantizer none, else 0", type=parse_qk_rank)
    qk_rank_overrides: dict = option({}, "--qk-rank-layer", "per-layer override of --qk-rank: a ratio <= 1 or an "
                                     "integer rank > 1 (repeatable)", type=parse_layer_ratio, action="append",
                                     metavar="LAYER=RATIO")
    qk_rank_ladder: tuple[float, ...] = option((0.5, 0.25, 0.125), "--qk-rank-ladder",
                                               "ratios offered to --qk-rank joint", type=parse_floats)
    search_steps: int = option(0, "--search-steps", "KL-guided search steps over the allocation, on held-out "
                               "calibration samples (0: off)", type=int)
    search_samples: int = option(8, "--search-samples", "calibration samples held out for the search", type=int)
    check_samples: int = option(4, "--check-samples", "calibration samples held out to check an allocated run "
                                "against the quantizer's uniform setting before saving (0: no check)", type=int)
    check_inputs: str = option("auto", "--check-inputs", "what the baseline check's uniform layers are calibrated "
                               "on: 'own' (the uniform model's own hidden states: exactly the model a uniform run "
                               "stores), 'shared' (the allocated run's inputs, with the matrices it stores at the "
                               "uniform setting reused: cheaper, but a weaker uniform model when the allocation is "
                               "bad) or 'auto' (shared, then own unless the allocation wins by a clear margin)", choices=CHECK_INPUTS)
    allocation: str = option("rd", "--allocation", "bit allocation: rate-distortion, the paper's rule, or uniform "
                             "int(--bits)", choices=ALLOCATIONS)
    fisher: str = option("empirical", "--fisher", "labels of the sensitivity pass that weights each matrix's damage: "
                         "'empirical' (the calibration text's next tokens) or 'sampled' (tokens drawn from the "
                         "model's own prediction: the Fisher of KL to the original model)", choices=FISHER_LABELS)
    fisher_tokens: int | None = option(None, "--fisher-tokens", "calibration tokens of the sensitivity pass (default: "
                                       f"{FISHER_TOKENS}, or fewer where the quantizer asks for them: 8192 for E8 "
                                       "under incoherence)", type=int, metavar="N")
    damage: str = option("measured", "--damage", "what the rd allocation weighs settings by: 'estimate' (each matrix's "
                         "Fisher-weighted quadratic error), 'measured' (the estimate scaled per decoder layer to the "
                         "held-out KL measured with the layer quantized at probe settings) or 'measured-types' (per "
                         "layer and per projection type); the last two need held-out samples, --check-samples", choices=DAMAGES)
    granularity: str = option("layer", "--granularity", "rd allocation unit: each decoder layer or each matrix",
                              choices=GRANULARITIES)
    calib_samples: int = option(128, "--calib-samples", "number of calibration samples", type=int)
    calib_seq_len: int = option(512, "--calib-seq-len", "tokens per text calibration sample", type=int)
    calib_jsonl: str | None = option(None, "--calib-jsonl", 'JSONL of {"image","text"} or '
                                     '{"image","question","answer"} records')
    calib_text: str | None = option(None, "--calib-text", "plain text file for text-only calibration")
    preset: str | None = option(None, "--preset", "defaults for a calibration source: 'stand-in-text' (GPTQ shrinks "
                                "XᵀX's off-diagonal by half), 'none' (the default)")
    finetune_steps: int = option(0, "--finetune-steps", "after each decoder layer is compressed, Adam steps on its "
                                 "continuous stored parameters (scales, codebooks, E8 scales, norms, biases; codes fixed) "
                                 "against the original layer's output; kept only if held-out calibration error falls "
                                 "(0: off)", type=int)
    finetune_lr: float = option(1e-2, "--finetune-lr", "Adam step of --finetune-steps, relative to each tensor's RMS",
                                type=float)
    finetune_within: bool = option(False, "--finetune-within-layer", "with --finetune-steps, also tune after each "
                                   "group of a layer's matrices is quantized, the not yet quantized ones included "
                                   "(QuIP#'s order; costs a tuning per input group)", action="store_true")
    e2e_steps: int = option(0, "--e2e-steps", "after every layer, Adam steps on all continuous stored parameters of "
                            "the compressed model against the original model's next-token distribution (KL on "
                            "calibration samples); kept only if held-out KL falls (0: off)", type=int)
    e2e_lr: float = option(1e-2, "--e2e-lr", "Adam step of --e2e-steps, relative to each tensor's RMS", type=float)
    density_mass: float = option(0.9, "--density-mass", "attention mass that defines density", type=float)
    seed: int = option(0, "--seed", "random seed (calibration sampling, everything else)", type=int)
    device: str = option("cpu", "--device", "device for the heavy work (XᵀX, quantizers, measurements, sensitivity, "
                         "search), one decoder layer at a time; the model stays on the CPU")
    layers: tuple[int, ...] | None = option(None, "--layers", "compress only these decoder layers (comma-separated "
                                            "indices; unset: all)", type=parse_ints)
    stream: bool = option(False, "--stream", "read the model one decoder layer at a time from its safetensors and "
                          "write each layer as it finishes (implied by --resume / --max-memory)", action="store_true")
    max_memory: float | None = option(None, "--max-memory", "with --stream: GB of caught activations kept in memory "
                                      "(fp16) before spilling to disk", type=float, metavar="GB")

    def check(self) -> None:
        """Refuse nonsensical options (one line each); never changes the config."""
        if not (0 < self.bits <= 16):
            raise CaspError(f"--bits must be in (0, 16], got {self.bits}")
        if self.fisher not in FISHER_LABELS:
            raise CaspError(f"--fisher must be one of {', '.join(FISHER_LABELS)}, got {self.fisher!r}")
        if self.fisher_tokens is not None and self.fisher_tokens < 1:
            raise CaspError(f"--fisher-tokens must be >= 1, got {self.fisher_tokens}")
        if self.check_inputs not in CHECK_INPUTS:
            raise CaspError(f"--check-inputs must be one of {', '.join(CHECK_INPUTS)}, got {self.check_inputs!r}")
        if self.damage not in DAMAGES:
            raise CaspError(f"--damage must be one of {', '.join(DAMAGES)}, got {self.damage!r}")
        r = self.qk_rank
        if (r not in QK_RANK_WORDS) if isinstance(r, str) else (r is not None and not 0.0 <= float(r) <= 1.0):
            raise CaspError(f"--qk-rank must be a ratio in [0, 1], 'auto' or 'joint', got {r!r}")
        if r == "joint" and (self.allocation != "rd" or self.quantizer == "none"):
            raise CaspError("--qk-rank joint (the default) chooses ranks with the bit allocation: it needs "
                            "--allocation rd and a quantizer; give --qk-rank RATIO (0 disables) otherwise")
        if r == "joint" and self.qk_rank_overrides:
            raise CaspError("--qk-rank-layer fixes ranks; it cannot be combined with --qk-rank joint")
        for layer, v in self.qk_rank_overrides.items():
            if v < 0 or (v > 1 and v != int(v)):
                raise CaspError(f"rank override for layer {layer} must be a ratio in [0, 1] or an integer rank, got {v}")
        if any(not (0 < v < 1) for v in self.qk_rank_ladder):
            raise CaspError(f"--qk-rank-ladder ratios must be in (0, 1), got {self.qk_rank_ladder}")
        if self.search_steps < 0 or self.search_samples < 1:
            raise CaspError("--search-steps must be >= 0 and --search-samples >= 1")
        if self.check_samples < 0:
            raise CaspError(f"--check-samples must be >= 0, got {self.check_samples}")
        if self.finetune_steps < 0 or self.e2e_steps < 0:
            raise CaspError(f"--finetune-steps and --e2e-steps must be >= 0, got {self.finetune_steps} and {self.e2e_steps}")
        if not (self.finetune_lr > 0 and self.e2e_lr > 0):
            raise CaspError(f"--finetune-lr and --e2e-lr must be positive, got {self.finetune_lr} and {self.e2e_lr}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise CaspError(f"--max-memory must be a positive number of GB, got {self.max_memory}")
        if self.allocation not in ALLOCATIONS:
            raise CaspError(f"--allocation must be rd, paper or uniform, got {self.allocation!r}")
        if self.granularity not in GRANULARITIES:
            raise CaspError(f"--granularity must be matrix or layer, got {self.granularity!r}")
        if self.preset not in (None, "none", "stand-in-text"):
            raise CaspError(f"--preset must be stand-in-text or none, got {self.preset!r}")
        if self.calib_samples < 1:
            raise CaspError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_seq_len < 2:
            raise CaspError(f"--calib-seq-len must be >= 2, got {self.calib_seq_len}")
        if self.calib_jsonl and self.calib_text:
            raise CaspError("give either --calib-jsonl or --calib-text, not both")
        if not (0.0 < self.density_mass <= 1.0):
            raise CaspError(f"--density-mass must be in (0, 1], got {self.density_mass}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise CaspError(f"--layers must list decoder layer indices >= 0, got {self.layers}")

    def validate(self) -> "CompressionConfig":
        """`check`, for callers of the earlier API; returns the config unchanged."""
        self.check()
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qk_rank_ladder"] = list(self.qk_rank_ladder)
        d["quantizer_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.quantizer_options.items()}
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["qk_rank_overrides"] = {str(k): v for k, v in self.qk_rank_overrides.items()}
        return d


def flagged_fields() -> list:
    """The config fields that are `casp compress` flags."""
    return [f for f in fields(CompressionConfig) if "flag" in f.metadata]
