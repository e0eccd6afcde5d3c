"""Hadamard matrices and fast orthogonal transforms over the last dimension (plain tensors, no model).

Incoherence processing (QuIP#'s randomized Hadamard transform) rotates a weight so that no entry is
much larger than the RMS. For a size n that is not a power of two we write n = K·p with p a power
of two and K the order of a small Hadamard matrix, and use the Kronecker product H_K ⊗ H_p: no
padding, and the cost is O(n log n + n·K) per vector instead of the O(n²) of a dense matrix.

* `hadamard_matrix(k)`: a ±1 matrix with H Hᵀ = k I. Powers of two by Sylvester's doubling; other
  orders from the Paley constructions over a prime field (Paley I: q ≡ 3 mod 4 gives order q+1;
  Paley II: q ≡ 1 mod 4 gives order 2(q+1)), times a power of two by a Kronecker product.
* `hadamard_factor(n)`: (K, p) with n = K·p and K ≤ `MAX_FACTOR_ORDER`, or None.
* `fwht(x)`: the orthonormal Walsh–Hadamard transform x·H_p/√p for p a power of two.
* `hadamard_transform(x, transpose)`: x·Mᵀ (or x·M) with M = (H_K ⊗ H_p)/√n.
* `block_orthogonal_transform(x, seed, transpose)`: the fallback for sizes with no factorisation,
  random orthogonal blocks from a seed combined with a Hadamard of the power-of-two part.

All transforms apply a list of small dense factors, one per axis of x reshaped to (…, d₁, d₂, …):
(A ⊗ B) acts on the index k·|B| + j as A on k and B on j. Sylvester matrices are Kronecker powers
of H_2, so a power-of-two factor is split into chunks of at most 2^`_RADIX_BITS` (a reshape-based
FWHT of radix 2^r: log p / r passes of a small matmul each).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "MAX_FACTOR_ORDER",
    "FALLBACK_MAX_BLOCK",
    "supported_orders",
    "hadamard_matrix",
    "hadamard_factor",
    "fwht",
    "hadamard_transform",
    "random_orthogonal",
    "block_orthogonal_layout",
    "block_orthogonal_transform",
]

MAX_FACTOR_ORDER = 256     # largest K that `hadamard_factor` uses: the dense K×K step costs K flops per entry
FALLBACK_MAX_BLOCK = 1024  # largest dense random orthogonal block of the fallback
_CACHE_MAX_ORDER = 1024    # hadamard_matrix caches orders up to this (int8, ≤ 1 MiB each)
_RADIX_BITS = 6            # power-of-two factors are applied in chunks of at most 64


# --------------------------------------------------------------------------------------------
# constructions

def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ of GF(q), q an odd prime (int64)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order q+1 for a prime q ≡ 3 mod 4: H = I + S, S = [[0, 1ᵀ], [−1, Q]] skew with S Sᵀ = q I."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1) for a prime q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] symmetric with C² = q I, then
    H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] (the two cross terms cancel)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley_prime(k: int) -> tuple[int, int] | None:
    """(construction 1 or 2, q) of a Paley matrix of order exactly k, or None (Paley I preferred)."""
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return 1, k - 1
    q = k // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return 2, q
    return None


def _base_order(k: int, limit: int | None = None) -> int | None:
    """The smallest K (≤ limit) with k = K·2^a and K = 1 or a Paley order, or None."""
    if k < 1:
        return None
    p = k & -k
    while p >= 1:
        base = k // p
        if limit is not None and base > limit:
            return None
        if base == 1 or _paley_prime(base) is not None:
            return base
        p //= 2
    return None


def _hadamard_int(k: int) -> torch.Tensor:
    base = _base_order(k)
    if base is None:
        raise ValueError(f"no Hadamard matrix of order {k} is constructed here "
                         "(powers of two, Paley I/II orders over primes, and those times powers of two)")
    if base == 1:
        return _sylvester(k)
    kind, q = _paley_prime(base)
    return torch.kron(_paley1(q) if kind == 1 else _paley2(q), _sylvester(k // base))


def hadamard_matrix(k: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order k (float64, H Hᵀ = k I); ValueError when none is constructed.

    Orders: 1, 2, and K·2^a with K a power of two or a Paley order (q+1 for a prime q ≡ 3 mod 4,
    2(q+1) for a prime q ≡ 1 mod 4). Results are cached; the returned tensor is a fresh copy.
    """
    k = int(k)
    return (_hadamard_cached(k) if k <= _CACHE_MAX_ORDER else _hadamard_int(k)).to(torch.float64)


@lru_cache(maxsize=None)
def _hadamard_cached(k: int) -> torch.Tensor:
    return _hadamard_int(k).to(torch.int8)


def supported_orders(limit: int) -> list[int]:
    """Every order ≤ limit that `hadamard_matrix` constructs."""
    return [k for k in range(1, limit + 1) if _base_order(k) is not None]


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """(K, p) with n = K·p, p a power of two and K ≤ MAX_FACTOR_ORDER the smallest constructed
    Hadamard order that fits (K = 1 for powers of two), or None."""
    if n < 1:
        return None
    base = _base_order(n, MAX_FACTOR_ORDER)
    return None if base is None else (base, n // base)


# --------------------------------------------------------------------------------------------
# applying Kronecker products of small factors

@lru_cache(maxsize=256)
def _scaled_hadamard(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (hadamard_matrix(k) / math.sqrt(k)).to(dtype=dtype, device=device)


def _pow2_factors(p: int) -> list[int]:
    """Chunks of at most 2^_RADIX_BITS whose product is p (Sylvester H_p is their Kronecker product)."""
    bits = p.bit_length() - 1
    chunks = [_RADIX_BITS] * (bits // _RADIX_BITS) + ([bits % _RADIX_BITS] if bits % _RADIX_BITS else [])
    return [1 << c for c in chunks]


def _kron_apply(x: torch.Tensor, factors: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
    """x·(A₁ ⊗ A₂ ⊗ …)ᵀ over the last dim, factors (dᵢ, Aᵢ) with Aᵢ None for the identity.

    Works on the last axis only: one tall (rows, d) @ (d, d) matmul per factor, then the axes are
    rotated by one (…, rest, d) → (…, d, rest), so after the last factor the order is restored.
    """
    shape = x.shape
    n = shape[-1]
    if math.prod(d for d, _ in factors) != n:
        raise ValueError(f"factors {[d for d, _ in factors]} do not multiply to the last dim {n}")
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for d, a in reversed(factors):
        if d == 1:
            continue
        if a is not None:
            y = y.reshape(-1, d) @ a.T
        if d < n:
            y = y.reshape(rows, n // d, d).transpose(1, 2)
    return y.reshape(shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of the last dim (a power of two): x·H_p/√p, Sylvester order.

    H_p is symmetric, so this map is its own inverse. Cost O(p log p) per vector.
    """
    p = x.shape[-1]
    if not _is_power_of_two(p):
        raise ValueError(f"fwht needs a power-of-two last dim, got {p}")
    return _kron_apply(x, [(c, _scaled_hadamard(c, x.dtype, x.device)) for c in _pow2_factors(p)])


def hadamard_transform(x: torch.Tensor, transpose: bool = False, order: int | None = None) -> torch.Tensor:
    """x·Mᵀ over the last dim (M applied to every vector), or x·M with transpose=True, where
    M = (H_K ⊗ H_p)/√n is orthonormal and (K, p) = hadamard_factor(n), or K = `order` when given
    (a stored model pins K so that later additions to the constructed orders cannot change M).

    Paley matrices are not symmetric, so M ≠ Mᵀ in general; M's inverse is Mᵀ.
    """
    n = x.shape[-1]
    if order is None:
        fac = hadamard_factor(n)
        if fac is None:
            raise ValueError(f"no Hadamard factorisation for size {n}; use block_orthogonal_transform")
        k, p = fac
    else:
        k, p = int(order), n // int(order)
        if k * p != n or not _is_power_of_two(p):
            raise ValueError(f"order {k} does not give size {n} times a power of two")
    hk = _scaled_hadamard(k, x.dtype, x.device)
    factors = [(k, hk.T if transpose else hk)] + [(c, _scaled_hadamard(c, x.dtype, x.device))
                                                   for c in _pow2_factors(p)]
    return _kron_apply(x, factors)


# --------------------------------------------------------------------------------------------
# fallback: random orthogonal blocks from a seed

def random_orthogonal(b: int, seed: int) -> torch.Tensor:
    """A Haar-random b×b orthogonal matrix (float64): QR of a seeded Gaussian, signs fixed by diag(R)."""
    gen = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


@lru_cache(maxsize=512)
def _orthogonal_cached(b: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return random_orthogonal(b, seed).to(dtype=dtype, device=device)


def block_orthogonal_layout(n: int) -> tuple[int, int, int]:
    """(r, b, p) with n = r·b·p: p the largest power of two dividing n, b the odd part c = n/p when
    c ≤ FALLBACK_MAX_BLOCK, else the largest divisor of c that is ≤ FALLBACK_MAX_BLOCK; r = c/b."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    p = n & -n
    c = n // p
    b = c if c <= FALLBACK_MAX_BLOCK else max(d for d in range(1, FALLBACK_MAX_BLOCK + 1) if c % d == 0)
    return c // b, b, p


def block_orthogonal_transform(x: torch.Tensor, seed: int, transpose: bool = False,
                               block: int | None = None) -> torch.Tensor:
    """x·Mᵀ (or x·M with transpose=True) over the last dim for any size n, with
    M = I_r ⊗ Q_b ⊗ H_p/√p, Q_b = random_orthogonal(b, seed) and (r, b, p) = block_orthogonal_layout(n).

    For the sizes models use (odd part ≤ FALLBACK_MAX_BLOCK) r = 1 and M = Q_c ⊗ H_p mixes all n
    coordinates; otherwise M is block-diagonal with r blocks of size b·p. Q_b is regenerated from
    the seed (cached), so only the seed needs storing. `block` pins b (an odd divisor of n).
    """
    n = x.shape[-1]
    if block is None:
        r, b, p = block_orthogonal_layout(n)
    else:
        b, p = int(block), n & -n
        if b % 2 == 0 or (n // p) % b:
            raise ValueError(f"block {b} is not an odd divisor of {n}")
        r = n // (b * p)
    q = _orthogonal_cached(b, int(seed), x.dtype, x.device)
    factors = [(r, None), (b, q.T if transpose else q)] + [(c, _scaled_hadamard(c, x.dtype, x.device))
                                                          for c in _pow2_factors(p)]
    return _kron_apply(x, factors)
