"""CompressionConfig: everything one compression run needs to know, as plain data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from casp.errors import CaspError

DEFAULT_BITS = (2, 3, 4)


@dataclass
class CompressionConfig:
    """Options of `casp.compress`; every field has a CLI flag of the same name."""

    bits: float = 2.0
    quantizer: str = "gptq"
    qk_rank: float | str = 0.25
    qk_rank_overrides: dict[int, float] = field(default_factory=dict)
    allocation: str = "rd"
    granularity: str = "layer"
    candidate_bits: tuple[int, ...] = DEFAULT_BITS
    group_size: int = 128
    candidate_group_sizes: tuple[int, ...] = (128, -1)
    sym: bool = False
    damp: float = 0.01
    act_order: bool = True
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_jsonl: str | None = None
    calib_text: str | None = None
    density_mass: float = 0.9
    seed: int = 0
    device: str = "cpu"
    layers: tuple[int, ...] | None = None

    def validate(self) -> "CompressionConfig":
        if not (0 < self.bits <= 16):
            raise CaspError(f"--bits must be in (0, 16], got {self.bits}")
        if isinstance(self.qk_rank, str):
            if self.qk_rank != "auto":
                raise CaspError(f"--qk-rank must be a ratio in [0, 1] or 'auto', got {self.qk_rank!r}")
        elif not (0.0 <= float(self.qk_rank) <= 1.0):
            raise CaspError(f"--qk-rank must be in [0, 1], got {self.qk_rank}")
        for layer, r in self.qk_rank_overrides.items():
            if r < 0 or (r > 1 and r != int(r)):
                raise CaspError(f"rank override for layer {layer} must be a ratio in [0, 1] or an integer rank, got {r}")
        if self.allocation not in ("rd", "paper", "uniform"):
            raise CaspError(f"--allocation must be rd, paper or uniform, got {self.allocation!r}")
        if self.granularity not in ("matrix", "layer"):
            raise CaspError(f"--granularity must be matrix or layer, got {self.granularity!r}")
        for b in self.candidate_bits:
            if b not in (2, 3, 4, 8):
                raise CaspError(f"bit-widths must be among 2, 3, 4, 8; got {b}")
        if self.group_size == 0 or self.group_size < -1:
            raise CaspError(f"--group-size must be positive or -1 (per channel), got {self.group_size}")
        if self.calib_samples < 1:
            raise CaspError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_seq_len < 2:
            raise CaspError(f"--calib-seq-len must be >= 2, got {self.calib_seq_len}")
        if not (0.0 < self.density_mass <= 1.0):
            raise CaspError(f"--density-mass must be in (0, 1], got {self.density_mass}")
        if not (0.0 <= self.damp < 10):
            raise CaspError(f"--damp must be in [0, 10), got {self.damp}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise CaspError(f"--layers must list decoder layer indices >= 0, got {self.layers}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidate_bits"] = list(self.candidate_bits)
        d["candidate_group_sizes"] = list(self.candidate_group_sizes)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["qk_rank_overrides"] = {str(k): v for k, v in self.qk_rank_overrides.items()}
        return d
