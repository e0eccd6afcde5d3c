import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casp.quant.packing import pack_codes, packed_words, unpack_codes
from casp.quant.scalar import scalar_stored_bits as storage_bits
from casp.quant import QuantSpec, get_quantizer_class


@st.composite
def code_matrices(draw):
    bits = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    return bits, codes


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_round_trip_is_exact(case):
    bits, codes = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (codes.shape[0], packed_words(codes.shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes.to(torch.int32))
    assert torch.equal(pack_codes(codes, bits), packed)  # deterministic


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_32_codes_take_bits_words(bits):
    codes = torch.full((1, 32), (1 << bits) - 1)
    packed = pack_codes(codes, bits)
    assert packed.shape == (1, bits)
    assert torch.equal(packed, torch.full((1, bits), -1, dtype=torch.int32))  # all ones
    # 33 codes pad to 64
    assert pack_codes(torch.zeros(2, 33, dtype=torch.long), bits).shape == (2, 2 * bits)


def test_known_layout_2bit():
    # 32 codes at 2 bits: 8 bytes, code p in byte p % 8 at bit 2 * (p // 8); bytes little-endian
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, :3] = torch.tensor([1, 2, 3])
    codes[0, 8] = 3  # byte 0, slot 1
    packed = pack_codes(codes, 2)
    assert int(packed[0, 0]) == (1 | (3 << 2)) | (2 << 8) | (3 << 16)
    assert int(packed[0, 1]) == 0


def test_known_layout_3bit_planes():
    # 3 bits = 1-bit plane (bit 0: 4 bytes = word 0) then 2-bit plane (bits 1-2: words 1-2)
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 0] = 0b111
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [[1, 0b11, 0]]


def test_portable_byte_order_path():
    from casp.quant.packing import _bytes_from_words, _bytes_from_words_portable

    gen = torch.Generator().manual_seed(5)
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (3, 70), generator=gen)
        packed = pack_codes(codes, bits)
        assert torch.equal(_bytes_from_words_portable(packed), _bytes_from_words(packed))


def test_unpack_dtypes_and_no_aliasing():
    codes = torch.randint(0, 256, (2, 64))
    packed = pack_codes(codes, 8)
    before = packed.clone()
    out = unpack_codes(packed, 8, 64, dtype=torch.uint8)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)
    out.zero_()
    assert torch.equal(packed, before)
    assert unpack_codes(packed, 8, 64, dtype=torch.int64).dtype == torch.int64


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[-1]]), 2)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 2, 32)


SHAPES = [(1, 1), (7, 5), (33, 100), (64, 128), (31, 257), (96, 4097 // 8), (10, 130)]
GROUPS = [-1, 32, 64, 100, 128]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_storage_bits_matches_stored(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    rtn = get_quantizer_class("rtn")()
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen)
        for gs in GROUPS:
            spec = QuantSpec(bits, gs, sym)
            qw, _ = rtn.quantize(w, None, spec)
            assert qw.stored_bits() == storage_bits(spec, out_f, in_f), (spec, out_f, in_f)


def test_storage_bits_known_value():
    # 4096x4096, 2 bits, g128 asym: codes 2 b/w, fp16 scale per 128, 2-bit zero per 128
    spec = QuantSpec(2, 128, False)
    n = 4096 * 4096
    assert storage_bits(spec, 4096, 4096) == 2 * n + 16 * n // 128 + 2 * n // 128
    # a shorter last group is one more group
    assert storage_bits(QuantSpec(2, 128, True), 1, 129) == 2 * 160 + 16 * 2
