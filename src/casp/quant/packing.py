"""Bit-packing of integer codes into int32 words, and the exact storage size of packed tensors.

Layout of one row of codes of width `bits` (1..8):

1. The row is padded with zero codes to C, a multiple of 32 columns.
2. The code bits are split into *planes* whose widths f are the binary digits of `bits`, lowest
   code bits first: 2 → [2], 3 → [1, 2] (bit 0, then bits 1-2), 4 → [4], 8 → [8].
3. A plane is a run of C·f/8 bytes holding 8/f codes per byte, *slot-major*: with n = C·f/8,
   code p sits in byte (p mod n) at bit offset (p div n)·f. Unpacking slot s of every byte thus
   yields the contiguous codes [s·n, (s+1)·n): a few whole-array shifts and masks and one
   concatenation, with no fine-grained interleaving (which is what makes torch ops slow).
4. The planes are concatenated and every 4 bytes form one int32 word, little-endian.

So a padded row takes C·bits/32 words, and 32 codes always take exactly `bits` words.
"""
import math
import sys

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


def _words_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(rows, 4k) byte values (int64) → (rows, k) int32 words, little-endian."""
    rows = b.shape[0]
    b = b.view(rows, -1, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    word = torch.where(word >= (1 << 31), word - (1 << 32), word)  # two's complement
    return word.to(torch.int32)


def _bytes_from_words(words: torch.Tensor) -> torch.Tensor:
    """(rows, k) int32 words → (rows, 4k) uint8 bytes, little-endian."""
    if sys.byteorder == "little":
        return words.contiguous().view(torch.uint8)
    return _bytes_from_words_portable(words)


def _bytes_from_words_portable(words: torch.Tensor) -> torch.Tensor:
    """`_bytes_from_words` by shifts and masks, for any byte order of the host."""
    parts = [((words >> (8 * i)) & 0xFF).to(torch.uint8) for i in range(4)]
    return torch.stack(parts, dim=-1).view(words.shape[0], -1)



def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) of shape (rows, cols) into int32 (rows, words)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, cols), got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise TypeError("codes must be an integer tensor")
    planes = _planes(bits)
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    pcols = padded_cols(cols)
    if pcols != cols:
        c = torch.nn.functional.pad(c, (0, pcols - cols))
    out = []
    for width, offset in planes:
        slots = 8 // width
        field = ((c >> offset) & ((1 << width) - 1)).view(rows, slots, pcols // slots)
        shifts = torch.arange(0, 8, width, dtype=torch.int64, device=c.device).view(1, slots, 1)
        out.append(_words_from_bytes((field << shifts).sum(dim=1)))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def unpack_codes(
    packed: torch.Tensor, bits: int, cols: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 (rows, words) → codes (rows, cols) of `dtype`.

    `dtype=torch.uint8` is the cheapest output (every code fits a byte).
    """
    planes = _planes(bits)
    pcols = padded_cols(cols)
    if packed.dim() != 2 or packed.shape[1] != pcols // WORD_BITS * bits:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}, expected (rows, {pcols // WORD_BITS * bits}) "
            f"for {cols} columns at {bits} bits"
        )
    raw = _bytes_from_words(packed.to(torch.int32))
    codes = None
    start = 0
    for width, offset in planes:
        n = pcols * width // 8
        plane = raw[:, start:start + n]
        start += n
        if width == 8:
            field = plane.clone()  # never hand out a view of the packed buffer
        else:
            mask = (1 << width) - 1
            field = torch.cat([(plane >> s) & mask for s in range(0, 8, width)], dim=1)
        if offset:
            field <<= offset
        codes = field if codes is None else codes.bitwise_or_(field)
    codes = codes[:, :cols]
    return codes if dtype == torch.uint8 else codes.to(dtype)
