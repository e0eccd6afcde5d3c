"""The E8P nearest-codeword search compiled for the CPU (numba): `casp.algorithms.e8p.e8p_encode` in one call.

BlockLDLQ encodes one column block of every row at a time, so each call holds few vectors and the
tensor-op encoder spends most of its time dispatching its ~80 small operations. This kernel runs the
same exact search per vector in compiled loops: the D̂8 rounding fast path for each shift ±¼, and
where that leaves the vector unsettled, the search over the 256 absolute entries with the cheapest
single sign flip for an entry of the wrong parity. Same codes as the tensor encoder up to ties
(tested against it and against the whole codebook).
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:          # the tensor encoder stands in
    numba = njit = prange = None

DIM = 8
_SIGN_SHIFT = 8
_SHIFT_BIT = 15


def available() -> bool:
    return njit is not None


def _lattice_point(z, p):
    """Nearest point of D̂8 to z into p (Conway & Sloane: round z - ½; fix the parity on the coordinate
    farthest from its integer); returns its squared distance."""
    total = 0.0
    far, far_at = -1.0, 0
    for i in range(DIM):
        y = z[i] - 0.5
        f = np.round(y)
        d = y - f
        p[i] = f
        total += f
        if abs(d) > far:
            far, far_at = abs(d), i
    if int(total) % 2 != 0:
        p[far_at] += 1.0 if (z[far_at] - 0.5 - p[far_at]) >= 0 else -1.0
    cost = 0.0
    for i in range(DIM):
        p[i] += 0.5
        cost += (p[i] - z[i]) ** 2
    return cost


def _member_code(p, lut):
    """The code's entry index and sign bits of lattice point p when it is a codeword, else -1."""
    key, power = 0, 1
    for i in range(DIM):
        a = int(np.round(abs(p[i]) - 0.5))
        if a > 2:
            return -1
        key += a * power
        power *= 3
    k = lut[key]
    if k < 0:
        return -1
    code = k
    for i in range(1, DIM):
        if p[i] < 0:
            code |= 1 << (_SIGN_SHIFT + i - 1)
    return code


def _search(z, table, norms, odd_entry):
    """(cost, code bits without the shift) of the best of the 256 entries with their best signs."""
    az = np.empty(DIM)
    zz, odd = 0.0, 0
    for i in range(DIM):
        az[i] = abs(z[i])
        zz += az[i] * az[i]
        if z[i] < 0:
            odd ^= 1
    best, best_k, best_wrong = np.inf, 0, False
    for k in range(256):
        dot = 0.0
        for i in range(DIM):
            dot += table[k, i] * az[i]
        c = zz + norms[k] - 2.0 * dot
        wrong = odd != odd_entry[k]
        if wrong:
            if c >= best:
                continue
            flip = np.inf
            for i in range(DIM):
                flip = min(flip, table[k, i] * az[i])
            c += 4.0 * flip
        if c < best:
            best, best_k, best_wrong = c, k, wrong
    flip_at, low = -1, np.inf
    if best_wrong:
        for i in range(DIM):
            v = table[best_k, i] * az[i]
            if v < low:
                low, flip_at = v, i
    code = best_k
    for i in range(1, DIM):
        negative = z[i] < 0
        if i == flip_at:
            negative = not negative
        if negative:
            code |= 1 << (_SIGN_SHIFT + i - 1)
    return best, code


def _encode_vector(x, table, norms, odd_entry, lut):
    """The code of one 8-vector x."""
    z = np.empty(DIM)
    p = np.empty(DIM)
    best, best_code = np.inf, 0
    lattice = np.inf
    for shift_bit in range(2):
        t = -0.25 if shift_bit == 0 else 0.25
        for i in range(DIM):
            z[i] = x[i] - t
        cost = _lattice_point(z, p)
        lattice = min(lattice, cost)
        code = _member_code(p, lut)
        if code >= 0 and cost < best:
            best, best_code = cost, code | (shift_bit << _SHIFT_BIT)
    if best > lattice:
        best = np.inf
        for shift_bit in range(2):
            t = -0.25 if shift_bit == 0 else 0.25
            for i in range(DIM):
                z[i] = x[i] - t
            cost, code = _search(z, table, norms, odd_entry)
            if cost < best:
                best, best_code = cost, code | (shift_bit << _SHIFT_BIT)
    return best_code


def _encode_serial(x, table, norms, odd_entry, lut, codes):
    for v in range(x.shape[0]):
        codes[v] = _encode_vector(x[v], table, norms, odd_entry, lut)


def _encode_parallel(x, table, norms, odd_entry, lut, codes):
    for v in prange(x.shape[0]):
        codes[v] = _encode_vector(x[v], table, norms, odd_entry, lut)


if njit is not None:
    _lattice_point = njit(cache=True)(_lattice_point)
    _member_code = njit(cache=True)(_member_code)
    _search = njit(cache=True)(_search)
    _encode_vector = njit(cache=True)(_encode_vector)
    _encode_serial = njit(cache=True)(_encode_serial)
    _encode_parallel = njit(cache=True, parallel=True)(_encode_parallel)

PARALLEL_VECTORS = 512   # below this many vectors one thread does the whole call (768: 1.4x faster on 2 threads)


def tables(table: torch.Tensor, odd_entry: torch.Tensor, lut: torch.Tensor) -> tuple:
    """The kernel's arrays from `casp.algorithms.e8p`'s absolute table (256, 8), entry parities (256,) and
    lookup (3^8,)."""
    t = table.to(torch.float64).contiguous().numpy()
    return t, (t * t).sum(1), odd_entry.to(torch.int64).numpy(), lut.to(torch.int64).numpy()


def encode(x: torch.Tensor, arrays: tuple) -> torch.Tensor:
    """int32 codes of the 8-vectors x (n, 8) on the CPU, given `tables(...)`."""
    xs = x.detach().to(torch.float64).contiguous().numpy()
    codes = np.empty(xs.shape[0], dtype=np.int32)
    threads = torch.get_num_threads()
    run = _encode_serial
    if xs.shape[0] >= PARALLEL_VECTORS and threads > 1:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        run = _encode_parallel
    run(xs, *arrays, codes)
    return torch.from_numpy(codes)
