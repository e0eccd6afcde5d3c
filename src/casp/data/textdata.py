"""Built-in offline text for calibration and evaluation, and token windows cut from text.

Three shipped texts, disjoint by source (provenance and licences in docs/data.md):
calibration is Python's own documentation (help topics and standard-library docstrings),
evaluation is a literary public-domain text (Lewis Carroll, *Alice's Adventures in
Wonderland*), and a second evaluation text is legal English (GNU, Mozilla and Apache licence
texts). None needs a model hub or network.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "python_docs.txt"
EVALUATION_FILE = "alice_in_wonderland.txt"
SECOND_EVALUATION_FILE = "licences.txt"


@lru_cache(maxsize=None)
def _shipped(name: str) -> str:
    return resources.files("casp").joinpath("data", name).read_text(encoding="utf-8")


def calibration_text() -> str:
    """The built-in calibration text: Python 3.11 help topics and stdlib docstrings (~1 MB)."""
    return _shipped(CALIBRATION_FILE)


def evaluation_text() -> str:
    """The built-in evaluation text: *Alice's Adventures in Wonderland* (~148 kB)."""
    return _shipped(EVALUATION_FILE)


def evaluation_texts() -> dict[str, str]:
    """Both held-out texts by name: the novel and the licences (~115 kB), for results on two domains."""
    return {"alice": evaluation_text(), "licences": _shipped(SECOND_EVALUATION_FILE)}


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file (CRLF -> LF); ValueError if missing, binary, non-UTF-8 or empty."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read text file {path}: {e.strerror or e}") from e
    if b"\x00" in raw[:65536]:
        raise ValueError(f"{path} looks binary (it contains NUL bytes), not a text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from e
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as one 1-D LongTensor, without special tokens (no BOS/EOS)."""
    if not text or not text.strip():
        raise ValueError("text is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def window_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of up to `n_samples` non-overlapping windows placed at random in the text.

    The spare tokens (those not covered by any window) are split into random gaps, so the
    windows never overlap yet are not tied to a fixed grid. Sorted; deterministic under `seed`.
    """
    n = min(n_samples, n_tokens // seq_len)
    slack = n_tokens - n * seq_len
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, slack + 1, (n,), generator=g).sort().values
    return [int(gaps[i]) + i * seq_len for i in range(n)]


def text_calibration_batches(
    tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Cut `n_samples` random non-overlapping windows of `seq_len` tokens: LongTensor [n, seq_len].

    If the text holds fewer than `n_samples` windows, as many as fit are returned and a
    warning is logged; a text shorter than one window is an error.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples}, {seq_len}")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = window_starts(ids.numel(), n_samples, seq_len, seed)
    if len(starts) < n_samples:
        logger.warning(
            "text has %d tokens: only %d of the %d requested windows of %d tokens fit",
            ids.numel(), len(starts), n_samples, seq_len,
        )
    return torch.stack([ids[s : s + seq_len] for s in starts])
