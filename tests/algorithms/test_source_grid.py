"""Source-grid detection on weights made like GGUF's block types, and on weights on no grid."""
import torch
from hypothesis import given, settings, strategies as st

from casp.algorithms.source_grid import detect_grid, group_bits


def _blocks(rows, cols, group, gen):
    return rows, cols // group, group


def q4_1(rows=64, cols=256, gen=None):
    """Q4_1: per 32 columns, w = d·q + m, q in 0..15 (d, m fp16)."""
    r, n, g = _blocks(rows, cols, 32, gen)
    q = torch.randint(0, 16, (r, n, g), generator=gen).float()
    d = (torch.rand(r, n, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(r, n, 1, generator=gen) * 0.08).half().float()
    return (d * q + m).reshape(rows, cols)


def q4_k(rows=64, cols=512, gen=None):
    """Q4_K: super-blocks of 256, 8 sub-blocks of 32 each with a 6-bit scale and min: w = d·sc·q − dmin·m."""
    sup = cols // 256
    q = torch.randint(0, 16, (rows, sup, 8, 32), generator=gen).float()
    d = (torch.rand(rows, sup, 1, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(rows, sup, 1, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(1, 64, (rows, sup, 8, 1), generator=gen).float()
    mn = torch.randint(0, 64, (rows, sup, 8, 1), generator=gen).float()
    return ((d * sc) * q - dmin * mn).reshape(rows, cols)


def q6_k(rows=64, cols=512, gen=None):
    """Q6_K: super-blocks of 256, 16 sub-blocks of 16 with an 8-bit scale: w = d·sc·(q − 32), q in 0..63."""
    sup = cols // 256
    q = torch.randint(0, 64, (rows, sup, 16, 16), generator=gen).float()
    d = (torch.rand(rows, sup, 1, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(-128, 128, (rows, sup, 16, 1), generator=gen).float()
    return ((d * sc) * (q - 32)).reshape(rows, cols)


def q5_0(rows=64, cols=256, gen=None):
    """Q5_0: per 32 columns, w = d·(q − 16), q in 0..31."""
    r, n, g = _blocks(rows, cols, 32, gen)
    q = torch.randint(0, 32, (r, n, g), generator=gen).float()
    d = (torch.rand(r, n, 1, generator=gen) * 0.01 + 1e-3).half().float()
    return (d * (q - 16)).reshape(rows, cols)


def q8_0(rows=64, cols=256, gen=None):
    r, n, g = _blocks(rows, cols, 32, gen)
    q = torch.randint(-127, 128, (r, n, g), generator=gen).float()
    d = (torch.rand(r, n, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    return (d * q).reshape(rows, cols)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_each_gguf_block_type_is_found_with_its_bits_and_group(seed):
    gen = torch.Generator().manual_seed(seed)
    assert detect_grid(q4_1(gen=gen)) == (4, 32)
    assert detect_grid(q4_k(gen=gen)) == (4, 32)
    assert detect_grid(q6_k(gen=gen)) == (6, 16)
    assert detect_grid(q5_0(gen=gen)) == (5, 32)
    assert detect_grid(q8_0(gen=gen)) == (8, 32)


def test_weights_on_no_grid_are_not_taken_for_one():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=gen) * 0.02
    assert detect_grid(w) is None
    assert detect_grid(w.bfloat16().float()) is None
    assert detect_grid(w.half().float()) is None


def test_a_grid_survives_the_float32_round_trip_of_a_conversion():
    """A converted checkpoint stores the dequantized products in float32; a tiny error is still on the grid,
    a perturbation of a tenth of a step is not."""
    gen = torch.Generator().manual_seed(1)
    w = q4_1(gen=gen)
    assert detect_grid(w.float()) == (4, 32)
    step = (w.reshape(64, -1, 32).amax(-1) - w.reshape(64, -1, 32).amin(-1)).min() / 15
    noisy = w + 0.1 * step * torch.randn(w.shape, generator=gen)
    assert detect_grid(noisy) is None


def test_group_bits_counts_levels_and_flags_off_grid_groups():
    g = torch.tensor([[0.0, 0.5, 1.0, 1.5], [2.0, 2.0, 2.0, 2.0], [0.0, 0.1, 0.25, 1.0]])
    bits = group_bits(g, 4)
    assert bits[0].item() == 2 and bits[1].item() == 0 and bits[2].isinf()
