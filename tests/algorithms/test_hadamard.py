"""Hadamard constructions, the factorisation of model sizes, and the fast transforms against dense matrices."""
from __future__ import annotations

import math

import pytest
import torch

import casp.algorithms.hadamard as had
from casp.algorithms.hadamard import (
    block_orthogonal_layout, block_orthogonal_transform, fwht, hadamard_factor, hadamard_matrix, hadamard_transform,
    random_orthogonal, supported_orders,
)

PALEY_I = [12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, 104, 108, 128, 132, 140, 152, 164, 168, 180, 192, 200]
PALEY_II = [12, 28, 36, 60, 76, 84, 108, 124, 148, 180, 196]
UNSUPPORTED = [52, 92, 100, 116, 156, 172, 184, 188]  # need prime powers or other constructions

# every in/out size of the families we compress, and how it factorises (None: the fallback)
MODEL_SIZES = {64: (1, 64), 128: (1, 128), 192: (12, 16), 256: (1, 256), 576: (36, 16), 1536: (12, 128),
               4096: (1, 4096), 11008: None, 896: (28, 32), 4864: (76, 64), 5632: (44, 128),
               14336: (28, 512), 2048: (1, 2048), 8192: (1, 8192)}


def _dense(fn, n: int) -> torch.Tensor:
    """M with fn(x) = x Mᵀ, read off by transforming the identity."""
    return fn(torch.eye(n, dtype=torch.float64)).T


def test_every_constructed_order_is_hadamard():
    orders = supported_orders(256)
    assert set(PALEY_I + PALEY_II) <= set(orders)
    assert not set(UNSUPPORTED) & set(orders)
    for k in orders:
        h = hadamard_matrix(k)
        assert h.shape == (k, k) and torch.equal(h.abs(), torch.ones(k, k, dtype=torch.float64)), k
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), k


def test_unsupported_orders_raise_and_results_are_not_shared():
    for k in UNSUPPORTED + [3, 6, 10]:
        with pytest.raises(ValueError):
            hadamard_matrix(k)
    h = hadamard_matrix(12)
    h.zero_()
    assert hadamard_matrix(12).abs().min() == 1


def test_paley_matrices_are_not_symmetric():
    assert not torch.equal(hadamard_matrix(12), hadamard_matrix(12).T)  # so transposes matter


def test_factorisation_of_model_sizes():
    for n, want in MODEL_SIZES.items():
        assert hadamard_factor(n) == want, n
    assert hadamard_factor(320) == (20, 16)  # 5·64: order 5 does not exist, 20 does
    assert hadamard_factor(100) is None and hadamard_factor(7) is None
    assert hadamard_factor(1) == (1, 1)
    assert block_orthogonal_layout(11008) == (1, 43, 256)


@pytest.mark.parametrize("p", [1, 2, 8, 64, 128, 1024])
def test_fwht_is_the_scaled_sylvester_matrix(p):
    dense = _dense(fwht, p)
    torch.testing.assert_close(dense, hadamard_matrix(p) / math.sqrt(p), rtol=0, atol=1e-12)
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=0)


@pytest.mark.parametrize("n", [12, 20, 24, 28, 40, 48, 96, 192, 320, 576, 896])
def test_fast_transform_equals_the_dense_kronecker_product(n):
    k, p = hadamard_factor(n)
    m = torch.kron(hadamard_matrix(k), hadamard_matrix(p)) / math.sqrt(n)
    torch.testing.assert_close(_dense(hadamard_transform, n), m, rtol=0, atol=1e-12)
    torch.testing.assert_close(_dense(lambda x: hadamard_transform(x, transpose=True), n), m.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", sorted(MODEL_SIZES))
def test_transform_is_orthogonal_and_inverted_exactly(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    if hadamard_factor(n) is None:
        def fwd(v, transpose=False):
            return block_orthogonal_transform(v, seed=5, transpose=transpose)
    else:
        fwd = hadamard_transform
    y = fwd(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=0, atol=1e-10 * n)  # inner products kept
    torch.testing.assert_close(fwd(y, transpose=True), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(fwd(fwd(x, transpose=True)), x, rtol=0, atol=1e-10)


def test_any_leading_dims_and_float32():
    x = torch.randn(2, 3, 4, 1536, dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y[1, 2, 3], hadamard_transform(x[1, 2, 3]))
    y32 = hadamard_transform(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y, rtol=0, atol=1e-5)
    b32 = block_orthogonal_transform(x[..., :1032].float(), seed=1)  # 1032 = 129·8
    torch.testing.assert_close(b32.double(), block_orthogonal_transform(x[..., :1032], seed=1), rtol=0, atol=1e-5)
    assert hadamard_transform(torch.zeros(0, 192)).shape == (0, 192)


def test_fallback_is_the_dense_block_matrix(monkeypatch):
    n = 100  # 25·4: no Hadamard factorisation; Q_25 ⊗ H_4
    q = random_orthogonal(25, 7)
    m = torch.kron(q, hadamard_matrix(4) / 2)
    torch.testing.assert_close(_dense(lambda x: block_orthogonal_transform(x, 7), n), m, rtol=0, atol=1e-12)
    torch.testing.assert_close(_dense(lambda x: block_orthogonal_transform(x, 7, transpose=True), n), m.T,
                               rtol=0, atol=1e-12)
    assert not torch.allclose(_dense(lambda x: block_orthogonal_transform(x, 8), n), m)

    monkeypatch.setattr(had, "FALLBACK_MAX_BLOCK", 8)  # odd part 15 > 8: three blocks of Q_5 ⊗ H_4
    n = 60
    assert block_orthogonal_layout(n) == (3, 5, 4)
    m = torch.kron(torch.eye(3, dtype=torch.float64), torch.kron(random_orthogonal(5, 2), hadamard_matrix(4) / 2))
    torch.testing.assert_close(_dense(lambda x: block_orthogonal_transform(x, 2), n), m, rtol=0, atol=1e-12)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(43, 11)
    torch.testing.assert_close(q @ q.T, torch.eye(43, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(43, 11))


def test_pinned_order_and_block():
    """A stored model pins K (or the block b); a pinned order is still an exact Kronecker product."""
    x = torch.randn(2, 192, dtype=torch.float64)
    assert torch.equal(hadamard_transform(x, order=12), hadamard_transform(x))
    m24 = torch.kron(hadamard_matrix(24), hadamard_matrix(8)) / math.sqrt(192)
    torch.testing.assert_close(_dense(lambda v: hadamard_transform(v, order=24), 192), m24, rtol=0, atol=1e-12)
    for bad in (5, 7, 100):
        with pytest.raises(ValueError):
            hadamard_transform(x, order=bad)
    y = torch.randn(2, 11008, dtype=torch.float64)
    assert torch.equal(block_orthogonal_transform(y, 4, block=43), block_orthogonal_transform(y, 4))
    m = torch.kron(torch.eye(5, dtype=torch.float64), torch.kron(random_orthogonal(5, 4), hadamard_matrix(4) / 2))
    torch.testing.assert_close(_dense(lambda v: block_orthogonal_transform(v, 4, block=5), 100), m, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        block_orthogonal_transform(y, 4, block=2)
