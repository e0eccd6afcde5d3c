"""E8P, QuIP#'s 2-bit E8-lattice codebook: 2^16 points of E8 + ¼ coded in 16 bits per 8 weights.

The codebook (Tseng et al., QuIP#, 2024, §4.2 and App. C):

- D̂8 = {x ∈ (Z+½)^8 : Σx even}. Its 227 distinct elementwise absolute values |x| with ‖x‖² ≤ 10
  (exactly the vectors of {½, 3/2, 5/2}^8 with ‖a‖² ≤ 10), sorted lexicographically, plus 29
  "padding" absolute vectors of ‖a‖² = 12 make the 256-entry absolute table `e8p_abs_table()`.
  The padding is QuIP#'s own list (paper App. C.1, `get_norm12` in the reference code): vectors with
  five coordinates 3/2 and three ½, written below as the positions of the ½ coordinates.
  (An older revision of the reference code repeated one row of that list, which would make two codes
  decode to the same point; the list used here is the later, duplicate-free one.)
- Every coordinate of an entry a is a half-odd integer, so flipping one sign changes Σ s⊙a by an odd
  number: exactly 128 of the 256 sign patterns s put s⊙a in D̂8, those whose number of minus signs
  has the parity of Σa. Seven sign bits are stored; the sign of coordinate 0 follows from parity.
- A shift bit adds +¼ or -¼ to all coordinates. Since ½·1 ∈ D̂8, D̂8 - ¼ = D8 + ¼ and the union
  (D̂8 + ¼) ∪ (D̂8 - ¼) = (D8 ∪ D̂8) + ¼ = E8 + ¼: every codeword x has x - ¼·1 ∈ E8.

16-bit code layout (this module's own): bits 0-7 the absolute-table index, bits 8-14 the signs of
coordinates 1..7 (1 = negative), bit 15 the shift (1: +¼, 0: -¼). Decoding gathers one row of the
256×8 absolute table and one row of a 256×8 sign table indexed by (sign bits, parity of Σa).

The encoder is exact: for each shift and each of the 256 entries, the best signs are sign(y); if
their parity is wrong, flipping the coordinate with the smallest a_i·|y_i| costs the least
(4·a_i·|y_i|); the argmin over the 512 candidates is the nearest codeword.

For 3 to 6 bits later stages code the scaled residual (QuIP#'s RVQ, extended past its 4 bits): another
E8P code (16 bits per 8 weights) or one of 256 points of E8 (8 bits per 8 weights; `e8_1bit_table()`:
the origin, the 240 roots and 15 of the 16 points ±2e_i, all but -2e_7). 3 bits = E8P + E8, 4 = 2 E8P,
5 = 2 E8P + E8, 6 = 3 E8P (`STAGES`).

`quantize_matrix` codes a whole weight matrix: BlockLDLQ (`casp.algorithms.ldlq`) with this block
quantizer, for a few candidate scales, keeping the one with the lowest proxy loss.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from casp.algorithms import e8p_kernel
from casp.algorithms.hessian import prepare_hessian
from casp.algorithms.ldlq import block_ldlq, feedback_matrix_, proxy_loss

CODE_DIM = 8
NUM_CODES = 1 << 16
_SHIFT_BIT = 15
_SIGN_SHIFT = 8

# positions of the ½ coordinates of the 29 norm-12 padding entries (the other five are 3/2)
_NORM12_HALF_POSITIONS = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2),
    (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5),
    (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6), (1, 4, 6),
    (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6),
    (0, 1, 4), (2, 3, 7),
)


@functools.cache
def _abs_table64() -> torch.Tensor:
    base = [a for a in itertools.product((0.5, 1.5, 2.5), repeat=CODE_DIM) if sum(v * v for v in a) <= 10]
    pad = [tuple(0.5 if i in pos else 1.5 for i in range(CODE_DIM)) for pos in _NORM12_HALF_POSITIONS]
    table = torch.tensor(base + pad, dtype=torch.float64)
    assert table.shape == (256, CODE_DIM)
    return table


def e8p_abs_table(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 256×8 absolute table: 227 |x| of D̂8 with ‖x‖² ≤ 10 (lexicographic), then 29 of norm 12."""
    return _abs_table64().to(dtype=dtype, device=device)


@functools.cache
def _parity64() -> torch.Tensor:
    """1 where Σa is odd (the entry needs an odd number of minus signs), as int64 (256,)."""
    return (_abs_table64().sum(1).round().long() % 2)


@functools.cache
def _sign_table64() -> torch.Tensor:
    """(256, 8) of ±1: row (sign bits of coords 1..7) | parity << 7 gives all eight signs."""
    rows = []
    for j in range(256):
        bits, parity = j & 127, j >> 7
        neg = [(bits >> (i - 1)) & 1 for i in range(1, CODE_DIM)]
        neg0 = (sum(neg) + parity) % 2
        rows.append([1.0 - 2.0 * b for b in [neg0] + neg])
    return torch.tensor(rows, dtype=torch.float64)


@functools.cache
def _tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (_abs_table64().to(dtype=dtype, device=device), _sign_table64().to(dtype=dtype, device=device),
            (_parity64() << 7).to(device=device))


def e8p_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codewords (…, 8) of 16-bit codes (any integer dtype; int16 is read as its unsigned bits)."""
    c = codes.long() & 0xFFFF
    table, signs, parity = _tables(dtype, c.device)
    idx = c & 255
    sign_row = ((c >> _SIGN_SHIFT) & 127) | parity[idx]
    out = table[idx] * signs[sign_row]
    shift = ((c >> _SHIFT_BIT) & 1).to(dtype) * 0.5 - 0.25
    return out.add_(shift.unsqueeze(-1))


def e8p_codebook(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All 2^16 codewords, (65536, 8), row c = e8p_decode(c)."""
    return e8p_decode(torch.arange(NUM_CODES), dtype)


def _check_dim(x: torch.Tensor) -> None:
    if x.shape[-1] != CODE_DIM:
        raise ValueError(f"expected 8-vectors (last dimension {CODE_DIM}), got shape {tuple(x.shape)}")


@functools.cache
def _abs_lookup64() -> torch.Tensor:
    """(3^8,) int64: the absolute-table row of a vector with |x_i| - ½ = t_i ∈ {0, 1, 2}, indexed by
    Σ t_i·3^i; -1 where that vector is not in the table (‖x‖² > 10 and not a padding entry)."""
    lut = torch.full((3 ** CODE_DIM,), -1, dtype=torch.int64)
    t = (_abs_table64() - 0.5).round().long()
    lut[(t * _POW3).sum(1)] = torch.arange(256)
    return lut


_POW3 = torch.tensor([3 ** i for i in range(CODE_DIM)])


def _nearest_dhat8(z: torch.Tensor) -> torch.Tensor:
    """The nearest point of D̂8 = D8 + ½·1 to each row of z (n, 8) (Conway & Sloane's D_n decoder):
    round z - ½ to integers; if their sum is odd, round the coordinate farthest from its integer the
    other way; add ½ back."""
    y = z - 0.5
    f = torch.round(y)
    d = y - f
    odd = (f.sum(1).remainder(2) != 0).nonzero().squeeze(1)
    if odd.numel():
        i = d[odd].abs().argmax(1)
        step = torch.where(d[odd, i] >= 0, 1.0, -1.0).to(f.dtype)
        f[odd, i] += step
    return f + 0.5


def _nearer(best_cost, best_code, cost: torch.Tensor, code: torch.Tensor):
    """Per vector, the (cost, code) of the lower cost between the best so far (None: none yet) and a new shift's."""
    if best_cost is None:
        return cost, code
    take = cost < best_cost
    return torch.where(take, cost, best_cost), torch.where(take, code, best_code)


def e8p_encode(x: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P codeword of each 8-vector of x (…, 8): codes int32 (…) in [0, 2^16) and the codewords.

    Exact (up to ties). Fast path: for each shift ±¼, the nearest point of the whole lattice D̂8 (an
    O(8) rounding); when it lies in the codebook it is the codebook's nearest for that shift, and a
    shift whose lattice point is nearer than the other's codeword settles the vector. The few vectors
    left (their nearest lattice point is outside the 2^16 codewords) go to the exhaustive search of
    `e8p_encode_search`. On the CPU the search runs compiled, in float64 (`casp.algorithms.e8p_kernel`);
    elsewhere in tensor operations in x's dtype. The codewords come back in x's dtype.
    """
    _check_dim(x)
    shape = x.shape[:-1]
    x = x.reshape(-1, CODE_DIM)
    if x.device.type == "cpu" and e8p_kernel.available():
        codes = e8p_kernel.encode(x, _kernel_tables()).reshape(shape)
        return codes, e8p_decode(codes, x.dtype)
    return _encode_tensors(x, shape, chunk)


@functools.cache
def _kernel_tables() -> tuple:
    return e8p_kernel.tables(_abs_table64(), _parity64(), _abs_lookup64())


def _encode_tensors(x: torch.Tensor, shape, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`e8p_encode` in tensor operations (any device; the reference of the compiled CPU kernel)."""
    lut = _abs_lookup64().to(x.device)
    pow3 = _POW3.to(x.device)
    weights = (1 << torch.arange(CODE_DIM - 1, device=x.device)) << _SIGN_SHIFT
    best_cost = best_code = None
    lattice_cost = []
    for shift_bit, t in ((0, -0.25), (1, 0.25)):
        z = x - t
        p = _nearest_dhat8(z)
        cost = (p - z).pow(2).sum(1)
        a = (p.abs() - 0.5).round().long()
        inside = (a <= 2).all(1)
        k = lut[(a.clamp(max=2) * pow3).sum(1)]
        member = inside & (k >= 0)
        code = k.clamp(min=0) | ((p[:, 1:] < 0).long() * weights).sum(1) | (shift_bit << _SHIFT_BIT)
        cost_m = torch.where(member, cost, torch.full_like(cost, float("inf")))
        lattice_cost.append(cost)
        best_cost, best_code = _nearer(best_cost, best_code, cost_m, code)
    settled = best_cost <= torch.minimum(*lattice_cost)
    codes = best_code.to(torch.int32)
    rest = (~settled).nonzero().squeeze(1)
    if rest.numel():
        codes[rest] = e8p_encode_search(x[rest], chunk)[0]
    codes = codes.reshape(shape)
    return codes, e8p_decode(codes, x.dtype)


def e8p_encode_search(x: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """`e8p_encode` by exhaustive search over the 2 × 256 absolute entries (the reference, and the
    fallback of the fast path).

    For each shift and entry the best signs are sign(y); if their parity is wrong, flipping the
    coordinate with the smallest a_i·|y_i| costs the least (4·a_i·|y_i|). `chunk` vectors at a time: each
    chunk's (chunk, 256) cost table is swept ten times, and at 512 it stays in cache (2,048: 1.2× slower, one thread).
    """
    _check_dim(x)
    shape = x.shape[:-1]
    x = x.reshape(-1, CODE_DIM)
    dtype, device = x.dtype, x.device
    table, _, parity = _tables(dtype, device)
    odd_entry = (parity >> 7).bool()
    odd_entry_f = odd_entry.to(dtype)
    columns = table.T.contiguous()
    norms = (table * table).sum(1)
    codes = torch.empty(x.shape[0], dtype=torch.int32, device=device)
    weights = (1 << torch.arange(CODE_DIM - 1, device=device)) << _SIGN_SHIFT
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk]
        rows = torch.arange(xc.shape[0], device=device)
        best_cost = best_code = None
        for shift_bit, t in ((0, -0.25), (1, 0.25)):
            z = xc - t
            az = z.abs()
            neg = z < 0
            odd = neg.sum(1) % 2
            cost = torch.addmm(norms + (az * az).sum(1, keepdim=True), az, columns, alpha=-2.0)
            # cheapest single sign flip per entry: min_i a_i·|z_i| (a loop over 8 beats a reduction)
            flip = az[:, :1] * columns[0]
            for i in range(1, CODE_DIM):
                torch.minimum(flip, az[:, i:i + 1] * columns[i], out=flip)
            wrong = (odd.to(dtype).unsqueeze(1) - odd_entry_f).abs_()
            cost.addcmul_(wrong, flip, value=4.0)
            c, k = cost.min(1)
            neg = neg.long()
            fix = odd.bool() != odd_entry[k]
            flip_at = (az * table[k]).argmin(1)
            neg[rows[fix], flip_at[fix]] ^= 1
            code = k | (neg[:, 1:] * weights).sum(1) | (shift_bit << _SHIFT_BIT)
            best_cost, best_code = _nearer(best_cost, best_code, c, code)
        codes[s:s + chunk] = best_code.to(torch.int32)
    codes = codes.reshape(shape)
    return codes, e8p_decode(codes, dtype)


@functools.cache
def _e8_1bit64() -> torch.Tensor:
    pts = [[0.0] * CODE_DIM]
    for i, j in itertools.combinations(range(CODE_DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            p = [0.0] * CODE_DIM
            p[i], p[j] = si, sj
            pts.append(p)
    for signs in itertools.product((0.5, -0.5), repeat=CODE_DIM):
        if sum(v < 0 for v in signs) % 2 == 0:
            pts.append(list(signs))
    for sign, i in [(2.0, i) for i in range(CODE_DIM)] + [(-2.0, i) for i in range(CODE_DIM - 1)]:
        p = [0.0] * CODE_DIM
        p[i] = sign
        pts.append(p)
    table = torch.tensor(pts, dtype=torch.float64)
    assert table.shape == (256, CODE_DIM)
    return table


def e8_1bit_table(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 256 points of the 3-bit residual stage: 0, the 240 roots of E8, ±2e_i except -2e_7."""
    return _e8_1bit64().to(dtype=dtype, device=device)


def e8_1bit_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Points (…, 8) of 8-bit codes (uint8 or any integer dtype)."""
    return e8_1bit_table(dtype, codes.device)[codes.long() & 255]


def e8_1bit_encode(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the 256 points for each 8-vector of x (…, 8): codes int32 (…) and the points."""
    _check_dim(x)
    shape = x.shape[:-1]
    x = x.reshape(-1, CODE_DIM)
    table = e8_1bit_table(x.dtype, x.device)
    norms = (table * table).sum(1)
    codes = torch.cat([(norms - 2.0 * (x[s:s + chunk] @ table.T)).argmin(1)
                       for s in range(0, x.shape[0], chunk)]) if x.shape[0] else x.new_zeros(0, dtype=torch.long)
    codes = codes.to(torch.int32).reshape(shape)
    return codes, table[codes.long()]


# the code stages of each bit-width: "p" an E8P stage (16 bits per 8 weights), "r" the 256-point
# E8 stage (8 bits per 8 weights); each stage codes the scaled residual of the ones before it
STAGES = {2: ("p",), 3: ("p", "r"), 4: ("p", "p"), 5: ("p", "p", "r"), 6: ("p", "p", "p")}
STAGE_CODE_BITS = {"p": 16, "r": 8}


def stage_kinds(bits: int) -> tuple[str, ...]:
    """The stages of a bit-width: 2 E8P; 3 E8P + 1-bit E8; 4 two E8P; 5 two E8P + 1-bit E8; 6 three E8P."""
    if bits not in STAGES:
        raise ValueError(f"E8P supports 2 to 6 bits, got {bits}")
    return STAGES[bits]


def stage_count(bits: int) -> int:
    """Number of code stages of a bit-width (see `stage_kinds`)."""
    return len(stage_kinds(bits))


def _encoder(kind: str):
    return e8p_encode if kind == "p" else e8_1bit_encode


def stage_decoder(kind: str):
    """The decoder of a stage kind ("p": E8P, "r": the 256-point E8 table)."""
    return e8p_decode if kind == "p" else e8_1bit_decode


def _gains(bits: int, resid_scale) -> tuple[float, ...]:
    """Per-stage input gains s_1/s_k (stage 1: 1) from one ratio or one ratio per later stage."""
    ratios = (resid_scale,) * (stage_count(bits) - 1) if isinstance(resid_scale, (int, float)) else tuple(resid_scale)
    if len(ratios) != stage_count(bits) - 1:
        raise ValueError(f"{bits} bits need {stage_count(bits) - 1} residual ratios, got {len(ratios)}")
    gains = [1.0]
    for r in ratios:
        gains.append(gains[-1] * r)
    return tuple(gains)


def rvq_encode(x: torch.Tensor, bits: int, resid_scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual VQ of 8-vectors x (…, 8) at 2 to 6 bits per weight.

    Stage k codes (x - x̂_{<k})·g_k with its codebook (`stage_kinds`), g_1 = 1 and g_k = g_{k-1}·ratio_k;
    `resid_scale` is one ratio for every later stage or a tuple of them. Returns codes int32
    (…, stages) and x̂ = Σ_k c_k / g_k.
    """
    codes, approx = [], torch.zeros_like(x)
    for kind, gain in zip(stage_kinds(bits), _gains(bits, resid_scale)):
        c, v = _encoder(kind)((x - approx) * gain)
        codes.append(c)
        approx = approx + v / gain
    return torch.stack(codes, -1), approx


def rvq_decode(codes: torch.Tensor, bits: int, scales, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ_k scales[k]·stage_k(codes[…, k]) as (…, 8); the stage decoders follow `rvq_encode`."""
    out = None
    for k, kind in enumerate(stage_kinds(bits)):
        v = stage_decoder(kind)(codes[..., k], dtype) * scales[k]
        out = v if out is None else out + v
    return out


FP16_TINY = 2.0 ** -24


def fp16_exact(value: float) -> float:
    """`value` rounded to fp16 (clamped to the positive fp16 range), as a Python float."""
    return float(torch.tensor(min(max(value, FP16_TINY), 65504.0)).half())


def stage_scales(scale: float, bits: int, resid_scale) -> tuple[float, ...]:
    """fp16-exact per-stage scales s_k = s_1 / g_k (g_k from `resid_scale` as in `rvq_encode`)."""
    s1 = fp16_exact(scale)
    return (s1,) + tuple(fp16_exact(s1 / g) for g in _gains(bits, resid_scale)[1:])


def pad_to_codes(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of W up to a multiple of 8 inputs; H gets a diagonal block of its mean diagonal there."""
    n = w.shape[1]
    pad = -n % CODE_DIM
    if not pad:
        return w, h
    w = torch.nn.functional.pad(w, (0, pad))
    hp = torch.zeros(n + pad, n + pad, dtype=h.dtype, device=h.device)
    hp[:n, :n] = h
    hp[n:, n:] = float(h.diagonal().mean()) * torch.eye(pad, dtype=h.dtype, device=h.device)
    return w, hp


@dataclass
class E8PMatrix:
    """One quantized matrix: codes (out, ⌈in/8⌉, stages) int32 of the (permuted, padded) columns,
    fp16-exact stage scales, the column order (None: natural), Ŵ (out × in) and its proxy loss."""

    codes: torch.Tensor
    scales: tuple[float, ...]
    perm: torch.Tensor | None
    weight: torch.Tensor
    loss: float
    multiplier: float


STACK_ELEMENTS = 1 << 24   # weights of one stacked BlockLDLQ sweep (64 MB in float32); more trials take more sweeps


@dataclass(frozen=True)
class StageSpec:
    """One bit-width with its operating point: stage-1 RMS `rho` and the residual ratios (`rvq_encode`)."""

    bits: int
    rho: float
    resid_scale: object = 1.0


class _MixedRVQ:
    """The block quantizer of many stacked row groups, each with its own bit-width and stage gains.

    Row group j (rows offsets[j]:offsets[j+1]) is coded as `rvq_encode` at `bits[j]` with the per-row
    gains given; rows of the same stage kind are encoded in one call, so every candidate of a matrix
    shares one BlockLDLQ sweep.
    """

    def __init__(self, groups: list[tuple[int, int, tuple[float, ...]]], device):
        rows = sum(n for _, n, _ in groups)
        self.stages = max(stage_count(b) for b, _, _ in groups)
        self.plan = []
        for k in range(self.stages):
            for kind in ("p", "r"):
                idx, gain = [], []
                at = 0
                for bits, n, gains in groups:
                    kinds = stage_kinds(bits)
                    if k < len(kinds) and kinds[k] == kind:
                        idx.append(torch.arange(at, at + n))
                        gain.append(torch.full((n, 1), gains[k]))
                    at += n
                if idx:
                    i = torch.cat(idx).to(device)
                    self.plan.append((k, kind, None if i.numel() == rows else i, torch.cat(gain).to(device)))

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        approx = torch.zeros_like(t)
        codes = torch.zeros(t.shape[0], self.stages, dtype=torch.int32, device=t.device)
        for k, kind, idx, gain in self.plan:
            g = gain.to(t.dtype)
            if idx is None:
                c, v = _encoder(kind)((t - approx) * g)
                approx += v / g
                codes[:, k] = c
            else:
                c, v = _encoder(kind)((t[idx] - approx[idx]) * g)
                approx.index_add_(0, idx, v / g)
                codes[idx, k] = c
        return codes, approx


def _live_weight(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W in float32 with the columns of dead inputs (H_jj = 0: they never fire) set to zero."""
    w = w.detach().float()
    dead = h.diagonal() == 0
    if bool(dead.any()):
        w = w.clone()
        w[:, dead.to(w.device)] = 0.0
    return w


def scale_rms(w: torch.Tensor, h: torch.Tensor) -> float:
    """RMS(W) over its live inputs' columns (dead ones counted as zero): what the stage scales are built from.
    A row sample of W is coded as in the whole matrix when given the whole matrix's `scale_rms`."""
    w = _live_weight(w, h)
    return float(w.pow(2).mean().sqrt()) if w.numel() else 0.0


def quantize_matrix(w: torch.Tensor, h: torch.Tensor, bits: int, *, rho: float, resid_scale: float = 1.0,
                    multipliers: tuple[float, ...] = (1.0,), damp: float = 0.01, act_order: bool = False,
                    buffer: int = 128, shrink: float = 0.0, rms: float | None = None) -> E8PMatrix:
    """E8P / RVQ codes of W (out × in) by BlockLDLQ on H = XᵀX, with the best of a few scales.

    The first-stage scale is s1 = m·RMS(W)/rho for each multiplier m (W/s1 has RMS rho/m, rho being the
    codebook's operating RMS); later stages use s1/g_k (`stage_scales`). Each candidate is rounded with BlockLDLQ
    (H's off-diagonal scaled by 1 - `shrink`, then damped by `damp`·mean diag) and the one with the lowest tr(ΔHΔᵀ) on the undamped H wins.
    `act_order` visits the columns by decreasing H_jj (GPTQ's order; the caller stores `perm`).
    in_features that are not a multiple of 8 are padded with zero columns (dropped from Ŵ).
    `rms` replaces RMS(W) when W is a row sample of a larger matrix (then every row is coded as it
    would be in the whole matrix, up to the choice of multiplier).
    """
    return quantize_candidates(w, h, [StageSpec(bits, rho, resid_scale)], multipliers=multipliers, damp=damp,
                               act_order=act_order, buffer=buffer, shrink=shrink, rms=rms)[0]


def quantize_candidates(w: torch.Tensor, h: torch.Tensor, specs: list[StageSpec], *,
                        multipliers: tuple[float, ...] = (1.0,), damp: float = 0.01, act_order: bool = False,
                        buffer: int = 128, shrink: float = 0.0, rms: float | None = None) -> list[E8PMatrix]:
    """`quantize_matrix` of W at every spec (bit-width and operating point), in one BlockLDLQ sweep.

    Every (spec, multiplier) pair is a block of rows of one stacked matrix: they share H's preparation,
    its block LDL and every feedback product, and each column block is encoded once for all of them.
    Rows never mix (BlockLDLQ rounds each row on its own), so each result equals its own sweep's up to
    float rounding. Returns the best multiplier's result for each spec, in order.
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(h.shape)}, expected {(in_f, in_f)}")
    for spec in specs:
        stage_count(spec.bits)
    w = _live_weight(w, h)
    h = h.detach()
    perm = torch.argsort(h.diagonal().double(), descending=True, stable=True) if act_order else None
    wq, hq = (w[:, perm], h[perm][:, perm]) if perm is not None else (w, h)
    wp, hp = pad_to_codes(wq, prepare_hessian(hq, damp, shrink))
    a = feedback_matrix_(hp, CODE_DIM)[0].float()   # hp held A in float64: freed, as nothing below needs it
    del hp, hq
    if rms is None:
        rms = scale_rms(w, h)
    inverse = torch.argsort(perm) if perm is not None else None
    trials = [(spec, mult, stage_scales(mult * rms / spec.rho, spec.bits, spec.resid_scale))
              for spec in specs for mult in dict.fromkeys(multipliers)]
    per_sweep = max(1, STACK_ELEMENTS // max(1, out_f * wp.shape[1]))
    best: dict[StageSpec, E8PMatrix] = {}
    for first in range(0, len(trials), per_sweep):
        sweep = trials[first:first + per_sweep]
        groups = [(spec.bits, out_f, tuple(scales[0] / s for s in scales)) for spec, _, scales in sweep]
        stacked = torch.cat([wp / scales[0] for _, _, scales in sweep])
        _, codes = block_ldlq(stacked, None, _MixedRVQ(groups, w.device), CODE_DIM, buffer, a)
        for j, trial in enumerate(sweep):
            _keep_best(best, trial, codes[j * out_f:(j + 1) * out_f], (w, h, perm, inverse))
    return [best[spec] for spec in specs]


def _keep_best(best: dict, trial, codes: torch.Tensor, problem) -> None:
    """Decode one (spec, multiplier) trial and keep it in `best[spec]` if its proxy loss is the lowest yet."""
    spec, mult, scales = trial
    w, h, perm, inverse = problem
    out_f, in_f = w.shape
    c = codes[:, :, :stage_count(spec.bits)].contiguous()
    q = rvq_decode(c, spec.bits, scales).reshape(out_f, -1)[:, :in_f]
    if inverse is not None:
        q = q[:, inverse]
    loss = proxy_loss(w, q, h)
    if spec not in best or loss < best[spec].loss:
        best[spec] = E8PMatrix(c, scales, perm, q, loss, mult)
