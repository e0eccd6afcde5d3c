"""Shipped offline texts and calibration windows (byte tokenizer stand-in: fast, exact)."""
from __future__ import annotations

import logging
import re
from importlib import resources

import pytest
import torch

from casp.data.textdata import (
    calibration_text,
    evaluation_text,
    read_text_file,
    text_calibration_batches,
    tokenize_text,
    window_starts,
)


def byte_tokenizer(text, add_special_tokens=False, verbose=True):
    """One token per UTF-8 byte, called like a Hugging Face tokenizer."""
    return {"input_ids": list(text.encode("utf-8"))}


def shingles(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_shipped_texts_present_and_small():
    cal, ev = calibration_text(), evaluation_text()
    assert 500_000 < len(cal) < 1_500_000 and "The \"assert\" statement" in cal
    assert 100_000 < len(ev) < 200_000 and ev.lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert not re.search(r"[\r\x00-\x08\x0b-\x1f]", cal + ev)  # plain LF text, no control bytes
    data = resources.files("casp").joinpath("data")
    assert sum(f.stat().st_size for f in data.iterdir() if f.is_file()) < 3 * 2**20


def test_calibration_and_evaluation_are_disjoint():
    cal, ev = calibration_text(), evaluation_text()
    assert not shingles(cal) & shingles(ev)
    long_lines = {line.strip() for line in ev.splitlines() if len(line.strip()) > 40}
    assert not any(line in cal for line in long_lines)


def test_windows_deterministic_and_non_overlapping():
    text = evaluation_text()[:20_000]
    a = text_calibration_batches(byte_tokenizer, text, 8, 512, seed=3)
    b = text_calibration_batches(byte_tokenizer, text, 8, 512, seed=3)
    c = text_calibration_batches(byte_tokenizer, text, 8, 512, seed=4)
    assert a.dtype == torch.long and a.shape == (8, 512)
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = window_starts(20_000, 8, 512, seed=3)
    assert all(s2 - s1 >= 512 for s1, s2 in zip(starts, starts[1:]))
    assert starts[-1] + 512 <= 20_000
    ids = tokenize_text(byte_tokenizer, text)
    for row, s in zip(a, starts):
        assert torch.equal(row, ids[s : s + 512])


def test_windows_of_real_calibration_text_avoid_evaluation_text():
    ev = evaluation_text()
    batches = text_calibration_batches(byte_tokenizer, calibration_text(), 16, 256, seed=0)
    for row in batches:
        assert bytes(row.tolist()).decode("utf-8", errors="ignore")[8:-8] not in ev


def test_short_text_gives_fewer_windows_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="casp.data.textdata"):
        out = text_calibration_batches(byte_tokenizer, "x" * 1000, 5, 300, seed=0)
    assert out.shape == (3, 300)
    assert "only 3 of the 5" in caplog.text


@pytest.mark.parametrize("text, n, L, msg", [
    ("", 4, 8, "empty"),
    ("   \n ", 4, 8, "empty"),
    ("short", 1, 8, "fewer than one window"),
    ("long enough text", 0, 4, "positive"),
    ("long enough text", 1, 0, "positive"),
])
def test_batch_errors(text, n, L, msg):
    with pytest.raises(ValueError, match=msg):
        text_calibration_batches(byte_tokenizer, text, n, L, seed=0)


def test_read_text_file_normalises(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert read_text_file(p) == "line one\nline two\n"


@pytest.mark.parametrize("content, msg", [
    (b"", "empty"),
    (b" \n\t\n", "empty"),
    (b"PK\x03\x04\x00\x00binary", "binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_read_text_file_errors(tmp_path, content, msg):
    p = tmp_path / "f.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=msg):
        read_text_file(p)


def test_read_text_file_missing_or_directory(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_text_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_text_file(tmp_path)


def test_the_second_evaluation_text_is_disjoint_from_both_others():
    from casp.data.textdata import evaluation_texts

    texts = evaluation_texts()
    lic = texts["licences"]
    assert 100_000 < len(lic) < 150_000 and lic.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert not re.search(r"[\r\x00-\x08\x0b-\x1f]", lic)
    assert not shingles(lic) & shingles(texts["alice"])
    # A few stdlib docstrings carry a warranty disclaimer: 15 shared 8-word sequences out of ~15,000.
    assert len(shingles(lic) & shingles(calibration_text())) < 0.002 * len(shingles(lic))
