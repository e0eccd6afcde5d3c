"""Bit-packing of integer codes into int32 words, and the exact storage size of packed tensors.

Layout (per row, for a code width of `bits` in 1..8): the row is padded with zero codes to a
multiple of 32 columns, then the code bits are split into *planes* whose widths are the binary
digits of `bits`, narrowest (lowest code bits) first: 2 → [2], 3 → [1, 2] (bit 0, then bits 1-2),
4 → [4], 8 → [8]. A plane of
width f holds f bits of every code, 32 // f codes per word, code j of the word at bit offset j·f.
The planes are concatenated along the row, so a row of C (padded) codes takes C·bits/32 words and
32 codes always take exactly `bits` words. Every field sits inside one word, so unpacking is only
shifts and masks (no cross-word carries, which keeps 3-bit as cheap as 2- and 4-bit).
"""
from __future__ import annotations

import math

import torch

WORD_BITS = 32
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _planes(bits: int) -> list[tuple[int, int]]:
    """(width, bit offset inside the code) of each plane, low bits first."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    planes, offset = [], 0
    for width in (1, 2, 4, 8):
        if bits & width:
            planes.append((width, offset))
            offset += width
    return planes


def padded_cols(cols: int) -> int:
    """Columns after padding a row to a whole number of 32-code blocks."""
    return math.ceil(cols / WORD_BITS) * WORD_BITS


def packed_words(cols: int, bits: int) -> int:
    """int32 words one packed row of `cols` codes takes."""
    return padded_cols(cols) // WORD_BITS * bits


def packed_bits(rows: int, cols: int, bits: int) -> int:
    """Stored bits of a (rows, cols) code matrix after `pack_codes`."""
    return rows * packed_words(cols, bits) * WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) of shape (rows, cols) into int32 (rows, words)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, cols), got shape {tuple(codes.shape)}")
    planes = _planes(bits)
    rows, cols = codes.shape
    if codes.is_floating_point():
        raise TypeError("codes must be an integer tensor")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = padded_cols(cols) - cols
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    out = []
    for width, offset in planes:
        per_word = WORD_BITS // width
        field = (c >> offset) & ((1 << width) - 1)
        field = field.view(rows, -1, per_word)
        shifts = torch.arange(0, WORD_BITS, width, dtype=torch.int64, device=c.device)
        word = (field << shifts).sum(dim=-1)  # < 2^32, exact in int64
        word = torch.where(word >= (1 << 31), word - (1 << 32), word)  # two's complement
        out.append(word.to(torch.int32))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 (rows, words) → int32 codes (rows, cols)."""
    planes = _planes(bits)
    rows = packed.shape[0]
    pcols = padded_cols(cols)
    if packed.shape[1] != pcols // WORD_BITS * bits:
        raise ValueError(
            f"packed has {packed.shape[1]} words per row, expected {pcols // WORD_BITS * bits} "
            f"for {cols} columns at {bits} bits"
        )
    p = packed.to(torch.int32)
    codes = None
    start = 0
    for width, offset in planes:
        n = pcols * width // WORD_BITS
        words = p[:, start:start + n]
        start += n
        shifts = torch.arange(0, WORD_BITS, width, dtype=torch.int32, device=p.device)
        field = (words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        field = field.reshape(rows, pcols)
        if offset:
            field = field << offset
        codes = field if codes is None else codes | field
    return codes[:, :cols]


def storage_bits(spec, out_features: int, in_features: int) -> int:
    """Exact `QuantizedWeight.stored_bits()` of the scalar-grid format (RTN, GPTQ) for a shape.

    codes: packed (out, in) at `bits`; scales: fp16 (out, groups); zeros (asymmetric only):
    packed (groups, out) at `bits`. See `casp.quant.grid` for the format.
    """
    from casp.quant.grid import num_groups

    groups = num_groups(in_features, spec.group_size)
    total = packed_bits(out_features, in_features, spec.bits)
    total += out_features * groups * 16
    if not spec.sym:
        total += packed_bits(groups, out_features, spec.bits)
    return total
