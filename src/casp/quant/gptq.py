"""GPTQ (Frantar et al., 2022): quantize columns one by one, pushing each rounding error onto the
columns not yet quantized so that the layer output ‖(W - Q)X‖² stays small.

With H = XᵀX (plus damping) and U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), quantizing column
j with error e_j = (w_j - q_j) / U_jj is compensated by w_k -= e_j · U_jk for every k > j. The
updates are applied lazily in blocks of columns (one matrix product per block). With `act_order`
columns are visited by decreasing H_jj; group scales/zeros are then computed up front from the
original column order ("static groups"), so the stored format needs no permutation. Without it,
each group's grid is fitted when the sweep reaches the group, on the already-updated weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from casp.algorithms.hessian import prepare_hessian
from casp.quant.base import QuantizedWeight, Quantizer, register
from casp.quant.scalar import (
    SCALAR_FORMAT,
    QuantSpec,
    ScalarOptions,
    dequantize_grid,
    effective_group_size,
    grid_params,
    num_groups,
    reproduces,
    rtn_codes,
    to_quantized_weight,
)

log = logging.getLogger(__name__)


def inverse_hessian_cholesky(
    h: torch.Tensor, damp: float, max_tries: int = 8
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H).

    If a factorization fails, λ is raised tenfold and it is tried again (with a warning).
    Returns U (in h's dtype) and the λ that worked. `h` is damped in place (its diagonal gains
    λ): GPTQ's n×n matrices are the largest objects of a layer's compression, so no copy is made.
    """
    mean_diag = float(h.diagonal().mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    lam = damp * scale
    diagonal = h.diagonal().clone()
    for attempt in range(max_tries):
        h.diagonal().copy_(diagonal + lam)
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            del low
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, lam
        new_lam = lam * 10 if lam > 0 else 1e-6 * scale
        log.warning(
            "GPTQ: Cholesky failed with damping %.3g (attempt %d); retrying with %.3g",
            lam, attempt + 1, new_lam,
        )
        lam = new_lam
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damping {lam:.3g}")


def _prepare(weight: torch.Tensor, xtx: torch.Tensor, act_order: bool, damp: float, hessian_dtype,
             shrink: float = 0.0):
    """Weight with dead inputs zeroed (original column order), the visiting order, and U in that order.

    U is the upper Cholesky factor of the damped H⁻¹ (float32); perm is None without act_order.
    `shrink` scales H's off-diagonal by (1 - shrink): the per-input energies are kept, the
    cross-correlations of the calibration text (the part that moves most between domains) are trusted less.
    """
    in_features = weight.shape[1]
    if xtx.shape != (in_features, in_features):
        raise ValueError(f"xtx has shape {tuple(xtx.shape)}, expected {(in_features, in_features)}")
    w = weight.detach().to(torch.float32).clone()
    src = xtx.detach().to(device=w.device, dtype=hessian_dtype)
    diag = src.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    # a copy (the caller's XᵀX is never changed), as accumulated; damped below, where a failed Cholesky raises it
    h = prepare_hessian(src, None, shrink, dtype=hessian_dtype, symmetrize=False, order=perm)
    del src
    u, _ = inverse_hessian_cholesky(h, damp)
    return w, perm, u.to(torch.float32)


def _sweep(w: torch.Tensor, u: torch.Tensor, block_size: int, grid=None, block_grid=None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column sweep over w (columns in visiting order, updated in place): (codes int32, dequantized).

    Column j's grid is (scale, zero, maxq), each broadcastable over the rows. Fixed grids come a block at a
    time from `block_grid(i1, i2)` (rows × block tensors, maxq a number or a column); grids fitted during the
    sweep come a column at a time from `grid(j, w1, err1, i1, i2)`, where w1 / err1 are the current block's
    weights and errors.
    """
    rows, n = w.shape
    codes = torch.zeros(rows, n, dtype=torch.int32, device=w.device)
    q = torch.zeros(rows, n, dtype=torch.float32, device=w.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        c1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        diag = u1.diagonal().tolist()
        if block_grid is not None:
            scales, zeros, maxq = block_grid(i1, i2)
        for i in range(i2 - i1):
            if block_grid is None:
                scale, zero, maxq = grid(i1 + i, w1, err1, i1, i2)
            else:
                scale, zero = scales[:, i], zeros[:, i]
            col = w1[:, i]
            c = torch.round(col / scale + zero).clamp_(min=0)
            c = torch.minimum(c, maxq) if torch.is_tensor(maxq) else c.clamp_(max=maxq)
            qc = dequantize_grid(c, scale, zero)
            e = (col - qc) / diag[i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
            err1[:, i] = e
            c1[:, i] = c
            q[:, i1 + i] = qc
        codes[:, i1:i2] = c1.to(torch.int32)
        if i2 < n:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
    return codes, q


def _unpermute(t: torch.Tensor, perm) -> torch.Tensor:
    return t if perm is None else t[:, torch.argsort(perm)].contiguous()


def gptq_quantize(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool | None = None,
    hessian_dtype: torch.dtype = torch.float64,
    shrink: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on the scalar grid. Returns codes (out, in) int32, scale and zero (out, groups) float32
    (scale fp16-exact) and the dequantized float32 weight, equal to `dequantize_grid` of the codes.

    static_groups=None means "static iff act_order"; act_order with dynamic groups is not supported
    (the stored groups would no longer be contiguous).
    """
    if static_groups is None:
        static_groups = act_order
    if act_order and not static_groups:
        raise ValueError("act_order requires static groups in the scalar format")
    out_features, in_features = weight.shape
    bits, sym = spec.bits, spec.sym
    g = effective_group_size(in_features, spec.group_size)
    ng = num_groups(in_features, spec.group_size)
    w, perm, u = _prepare(weight, xtx, act_order, damp, hessian_dtype, shrink)
    # Per-channel grids are fitted on the whole (original) row either way.
    fixed = static_groups or ng == 1
    if fixed:
        _, scale, zero = rtn_codes(w, spec)
    else:
        scale = torch.zeros(out_features, ng, dtype=torch.float32, device=w.device)
        zero = torch.zeros_like(scale)
    group_of = ((perm if perm is not None else torch.arange(in_features, device=w.device)) // g).tolist()
    if perm is not None:
        w = w[:, perm]
    maxq = (1 << bits) - 1

    def grid(j, w1, err1, i1, i2):
        gi = group_of[j]
        if not fixed and j % g == 0:
            # Fit the group's grid on its current weights (no act_order here, so w is in the original
            # order): the part in this block is up to date in w1; columns past the block still owe
            # this block's pending updates.
            gend = min(j + g, in_features)
            cur = w1[:, j - i1:min(gend, i2) - i1]
            if gend > i2:
                rest = w[:, i2:gend] - err1[:, :j - i1] @ u[i1:j, i2:gend]
                cur = torch.cat([cur, rest], dim=1)
            scale[:, gi], zero[:, gi] = grid_params(cur, bits, sym)
        return scale[:, gi], zero[:, gi], maxq

    if fixed:
        cols = torch.tensor(group_of, device=w.device)
        codes, q = _sweep(w, u, block_size,
                          block_grid=lambda i1, i2: (scale[:, cols[i1:i2]], zero[:, cols[i1:i2]], maxq))
    else:
        codes, q = _sweep(w, u, block_size, grid)
    return _unpermute(codes, perm), scale, zero, _unpermute(q, perm)


MANY_ELEMENTS = 1 << 22   # weights swept at once by gptq_dequantize_many (rows of all settings × columns)


def gptq_dequantize_many(weight: torch.Tensor, xtx: torch.Tensor, specs: list[QuantSpec], damp: float = 0.01,
                         block_size: int = 128, hessian_dtype: torch.dtype = torch.float64,
                         shrink: float = 0.0) -> list[torch.Tensor]:
    """The dequantized weight of act-order GPTQ at each of `specs`, from one sweep over stacked copies.

    Equal (up to matrix-product rounding) to `gptq_quantize(..., act_order=True)` per spec: one
    Cholesky factor serves every setting and one column loop every copy, which is most of what
    measuring many candidates costs (on small matrices the per-column work is Python-bound).
    """
    out_features, in_features = weight.shape
    w, perm, u = _prepare(weight, xtx, True, damp, hessian_dtype, shrink)
    visiting = w[:, perm]
    per_chunk = max(1, MANY_ELEMENTS // max(1, out_features * in_features))
    result = []
    for c0 in range(0, len(specs), per_chunk):
        chunk = specs[c0:c0 + per_chunk]
        scales, zeros, maxq = [], [], []
        for s in chunk:
            _, scale, zero = rtn_codes(w, s)
            group_of = perm // effective_group_size(in_features, s.group_size)
            scales.append(scale[:, group_of])
            zeros.append(zero[:, group_of])
            maxq.append(torch.full((out_features,), (1 << s.bits) - 1, dtype=torch.float32, device=w.device))
        scale_cols, zero_cols, maxq = torch.cat(scales), torch.cat(zeros), torch.cat(maxq)
        _, q = _sweep(visiting.repeat(len(chunk), 1), u, block_size,
                      block_grid=lambda i1, i2: (scale_cols[:, i1:i2], zero_cols[:, i1:i2], maxq))
        result += list(_unpermute(q, perm).split(out_features))
    return result


STAND_IN_TEXT_SHRINK = 0.5   # --hessian-shrink of the stand-in-text preset


@dataclass(frozen=True)
class GPTQOptions(ScalarOptions):
    """GPTQ's own options on top of the scalar grid's."""

    damp: float = field(default=0.01, metadata={"flag": "--damp", "type": float,
                                                "help": "GPTQ damping (fraction of mean diag XᵀX)"})
    act_order: bool = field(default=True, metadata={"flag": "--no-act-order", "action": "store_false",
                                                    "help": "GPTQ without activation ordering"})
    shrink: float = field(default=0.0, metadata={
        "flag": "--hessian-shrink", "type": float,
        "help": "scale XᵀX's off-diagonal by (1 - this), in [0, 1] (default 0: GPTQ as published)"})
    block_size: int = 128
    static_groups: bool | None = None
    hessian_dtype: torch.dtype = torch.float64

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.damp < 10:
            raise ValueError(f"--damp must be in [0, 10), got {self.damp}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"--hessian-shrink must be in [0, 1], got {self.shrink}")


@register
class GPTQ(Quantizer):
    """GPTQ on the scalar grid (format "scalar"); needs the input second moment XᵀX."""

    name = "gptq"
    rows_independent = True
    Config = GPTQOptions
    format = SCALAR_FORMAT

    @classmethod
    def stand_in_text_options(cls) -> dict:
        """On a calibration text from another domain than the model's use, XᵀX's cross-correlations are that
        domain's: shrink them (docs/allocation.md, "GPTQ on a stand-in calibration text")."""
        return {"shrink": STAND_IN_TEXT_SHRINK}

    def candidates(self) -> list[QuantSpec]:
        return self.config.candidates()

    def reproduces_grid(self, setting: QuantSpec, grid: tuple[int, int]) -> bool:
        return reproduces(setting, grid)

    def uniform_setting(self, bits: float) -> QuantSpec:
        return self.config.uniform_setting(bits)

    def quantize(
        self, weight: torch.Tensor, xtx: torch.Tensor | None, spec: QuantSpec
    ) -> tuple[QuantizedWeight, torch.Tensor]:
        if xtx is None:
            raise ValueError("GPTQ needs xtx (the calibration XᵀX of the layer input)")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        c = self.config
        codes, scale, zero, q = gptq_quantize(
            weight, xtx, spec, damp=c.damp, block_size=c.block_size, act_order=c.act_order,
            static_groups=c.static_groups, hessian_dtype=c.hessian_dtype, shrink=c.shrink,
        )
        return to_quantized_weight(codes, scale, zero, spec, method=self.name), q

    def dequantize_many(self, weight: torch.Tensor, xtx: torch.Tensor | None, settings,
                        context: dict | None = None) -> list[torch.Tensor]:
        c = self.config
        if xtx is None or not c.act_order or c.static_groups is False:
            return super().dequantize_many(weight, xtx, settings, context)
        return gptq_dequantize_many(weight, xtx, list(settings), damp=c.damp, block_size=c.block_size,
                                    hessian_dtype=c.hessian_dtype, shrink=c.shrink)
