"""CompressionConfig: everything one compression run needs to know, as plain data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from casp.errors import CaspError


@dataclass
class CompressionConfig:
    """Options of `casp.compress`; every field has a CLI flag of the same name."""

    bits: float = 2.0
    quantizer: str = "gptq"
    quantizer_options: dict = field(default_factory=dict)   # the quantizer's own Config fields
    transform: str | None = None                            # a registered weight transform, or None
    transform_options: dict = field(default_factory=dict)
    qk_rank: float | str | None = None   # None: "joint" for rd allocation, 0.25 for paper / none, else 0
    qk_rank_overrides: dict[int, float] = field(default_factory=dict)
    qk_rank_ladder: tuple[float, ...] = (0.5, 0.25, 0.125)   # ratios offered to --qk-rank joint
    search_steps: int = 0        # KL-guided search over the allocation (0: off)
    search_samples: int = 8      # held-out calibration samples the search measures KL on
    allocation: str = "rd"
    granularity: str = "layer"
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_jsonl: str | None = None
    calib_text: str | None = None
    density_mass: float = 0.9
    seed: int = 0
    device: str = "cpu"
    layers: tuple[int, ...] | None = None
    stream: bool = False         # read the model one decoder layer at a time; write layers as they finish
    max_memory: float | None = None   # GB of caught activations held in memory before spilling to disk
    resume: bool = False         # continue the interrupted streamed run in OUT.partial

    def validate(self) -> "CompressionConfig":
        if self.qk_rank is None:
            if self.allocation == "rd" and self.quantizer != "none":
                self.qk_rank = "joint"
            else:
                self.qk_rank = 0.25 if self.allocation == "paper" or self.quantizer == "none" else 0.0
        if not (0 < self.bits <= 16):
            raise CaspError(f"--bits must be in (0, 16], got {self.bits}")
        if isinstance(self.qk_rank, str):
            if self.qk_rank not in ("auto", "joint"):
                raise CaspError(f"--qk-rank must be a ratio in [0, 1], 'auto' or 'joint', got {self.qk_rank!r}")
            if self.qk_rank == "joint" and (self.allocation != "rd" or self.quantizer == "none"):
                raise CaspError("--qk-rank joint (the default) chooses ranks with the bit allocation: it needs "
                                "--allocation rd and a quantizer; give --qk-rank RATIO (0 disables) otherwise")
            if self.qk_rank == "joint" and self.qk_rank_overrides:
                raise CaspError("--qk-rank-layer fixes ranks; it cannot be combined with --qk-rank joint")
        elif not (0.0 <= float(self.qk_rank) <= 1.0):
            raise CaspError(f"--qk-rank must be in [0, 1], got {self.qk_rank}")
        for layer, r in self.qk_rank_overrides.items():
            if r < 0 or (r > 1 and r != int(r)):
                raise CaspError(f"rank override for layer {layer} must be a ratio in [0, 1] or an integer rank, got {r}")
        if self.search_steps < 0 or self.search_samples < 1:
            raise CaspError("--search-steps must be >= 0 and --search-samples >= 1")
        if self.search_steps and (self.allocation != "rd" or self.quantizer == "none"
                                  or self.qk_rank not in (0, 0.0, "joint") or self.qk_rank_overrides):
            raise CaspError("--search-steps searches the rd allocation of whole matrices: it needs --allocation rd, "
                            "a quantizer, and --qk-rank 0 or joint")
        if self.max_memory is not None and self.max_memory <= 0:
            raise CaspError(f"--max-memory must be a positive number of GB, got {self.max_memory}")
        if self.resume or self.max_memory is not None:
            self.stream = True
        if self.stream and self.search_steps:
            raise CaspError("--search-steps measures KL on the whole model in memory; it cannot run with --stream")
        if self.allocation not in ("rd", "paper", "uniform"):
            raise CaspError(f"--allocation must be rd, paper or uniform, got {self.allocation!r}")
        if self.granularity not in ("matrix", "layer"):
            raise CaspError(f"--granularity must be matrix or layer, got {self.granularity!r}")
        if self.calib_samples < 1:
            raise CaspError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_seq_len < 2:
            raise CaspError(f"--calib-seq-len must be >= 2, got {self.calib_seq_len}")
        if not (0.0 < self.density_mass <= 1.0):
            raise CaspError(f"--density-mass must be in (0, 1], got {self.density_mass}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise CaspError(f"--layers must list decoder layer indices >= 0, got {self.layers}")
        self.build_quantizer()
        self.build_transform()
        return self

    def build_quantizer(self):
        """The quantizer with its own options, or None for `quantizer="none"` (fp16 storage)."""
        if self.quantizer == "none":
            if self.quantizer_options:
                raise CaspError(f"quantizer options {sorted(self.quantizer_options)} need a quantizer, not 'none'")
            return None
        from casp.quant.base import available_quantizers, get_quantizer_class

        try:
            cls = get_quantizer_class(self.quantizer)
        except KeyError:
            raise CaspError(f"unknown --quantizer {self.quantizer!r}; choose from none, "
                            f"{', '.join(available_quantizers())}") from None
        try:
            return cls.from_options({**cls.target_options(self.bits), **self.quantizer_options})
        except (TypeError, ValueError) as e:
            raise CaspError(str(e)) from None

    def build_transform(self):
        """The weight transform applied before quantization, or None."""
        if self.transform is None:
            return None
        from casp.transforms.base import get_transform_class

        try:
            return get_transform_class(self.transform).from_options(self.transform_options)
        except KeyError as e:
            raise CaspError(str(e).strip("'\"")) from None
        except (TypeError, ValueError) as e:
            raise CaspError(str(e)) from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qk_rank_ladder"] = list(self.qk_rank_ladder)
        d["quantizer_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.quantizer_options.items()}
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["qk_rank_overrides"] = {str(k): v for k, v in self.qk_rank_overrides.items()}
        return d
