"""Proof that a quantizer is one module: a toy 2-d vector quantizer defined here and nowhere else.

Pairs of consecutive weights of a row are coded by one of `entries` 2-d codewords (k-means on the
matrix's scaled pairs), codes packed at log2(entries) bits per pair, one fp16 scale per row and the
fp16 codebook stored. It compresses a tiny model under rd allocation with exact costs, saves, and
loads through transformers' `from_pretrained` after `import casp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import casp
from casp.config import CompressionConfig
from stored_bytes import linear_bytes_on_disk
from casp.nn.packed_linear import PackedLinear
from casp.quant.base import QuantizedWeight, Quantizer, StorageFormat, register
from casp.quant.packing import pack_codes, packed_bits, packed_words, unpack_codes


@dataclass(frozen=True)
class PairSetting:
    entries: int

    @property
    def code_bits(self) -> int:
        return int(math.log2(self.entries))

    def label(self) -> str:
        return f"pair{self.entries}"

    def describe(self) -> dict:
        return {"bits": self.code_bits / 2, "entries": self.entries}


@dataclass(frozen=True)
class PairOptions:
    candidate_entries: tuple[int, ...] = (16, 256)
    kmeans_iters: int = field(default=6)


def _pairs(n: int) -> int:
    return (n + 1) // 2


def pair_stored_bits(s: PairSetting, out_features: int, in_features: int) -> int:
    return packed_bits(out_features, _pairs(in_features), s.code_bits) + s.entries * 2 * 16 + out_features * 16


def pair_empty(meta: dict) -> dict[str, torch.Tensor]:
    out_f, in_f, entries = meta["out_features"], meta["in_features"], meta["entries"]
    bits = int(math.log2(entries))
    return {"codes": torch.zeros(out_f, packed_words(_pairs(in_f), bits), dtype=torch.int32),
            "codebook": torch.zeros(entries, 2, dtype=torch.float16),
            "scales": torch.zeros(out_f, 1, dtype=torch.float16)}


def pair_dequantize(qw: QuantizedWeight) -> torch.Tensor:
    m = qw.meta
    bits = int(math.log2(m["entries"]))
    codes = unpack_codes(qw.tensors["codes"], bits, _pairs(m["in_features"])).long()
    w = qw.tensors["codebook"].float()[codes].reshape(m["out_features"], -1)[:, :m["in_features"]]
    return w * qw.tensors["scales"].float()


PAIR_FORMAT = StorageFormat("toy-pairs", pair_dequantize, pair_empty, pair_stored_bits)


@register
class PairVQ(Quantizer):
    name = "toy-pairs"
    Config = PairOptions
    format = PAIR_FORMAT

    def candidates(self):
        return [PairSetting(e) for e in self.config.candidate_entries]

    def uniform_setting(self, bits: float):
        return PairSetting(2 ** int(2 * bits))

    def quantize(self, weight, xtx, s: PairSetting):
        out_f, in_f = weight.shape
        scales = weight.abs().amax(1, keepdim=True).clamp_min(1e-8).half()
        w = weight / scales.float()
        if in_f % 2:
            w = torch.nn.functional.pad(w, (0, 1))
        pts = w.reshape(-1, 2)
        gen = torch.Generator().manual_seed(0)
        book = pts[torch.randperm(pts.shape[0], generator=gen)[: s.entries]].clone()
        if book.shape[0] < s.entries:
            book = torch.cat([book, torch.zeros(s.entries - book.shape[0], 2)])
        for _ in range(self.config.kmeans_iters):
            assign = torch.cdist(pts, book).argmin(1)
            for j in range(s.entries):
                sel = pts[assign == j]
                if len(sel):
                    book[j] = sel.mean(0)
        book = book.half()
        codes = torch.cdist(pts, book.float()).argmin(1).reshape(out_f, -1)
        qw = QuantizedWeight({"codes": pack_codes(codes, s.code_bits), "codebook": book, "scales": scales},
                             {"format": self.format.name, "entries": s.entries,
                              "out_features": out_f, "in_features": in_f})
        return qw, pair_dequantize(qw)


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, scene_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "out"
    cfg = CompressionConfig(bits=3.0, quantizer="toy-pairs", qk_rank=0.25, calib_samples=8, calib_seq_len=32,
                            calib_text=str(scene_text), granularity="matrix")
    return casp.compress(tiny_llama_dir, out, cfg, progress=False), out


def test_allocated_with_exact_costs(compressed):
    res, out = compressed
    rows = res.report["layers"]
    q = PairVQ()
    for row in rows:
        assert row["stored_bits"] == q.stored_bits(PairSetting(row["entries"]), row["out_features"], row["in_features"])
    assert {row["entries"] for row in rows} == {16, 256}, "the budget should buy some but not all upgrades"
    assert res.report["average_bits"] <= 3.0
    assert linear_bytes_on_disk(out) * 8 == res.report["stored_bits"]


def test_from_pretrained_reproduces_logits_exactly(compressed):
    from transformers import AutoModelForCausalLM

    res, out = compressed
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.meta["format"] == "toy-pairs" for m in packed)
    ids = torch.randint(5, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, res.model(ids).logits)
