"""Attention maps from (post-RoPE) q and k, their density, and our perturbation bound.

Shapes: q is [batch, seq, heads, head_dim], k is [batch, seq, kv_heads, head_dim] (GQA: each
kv head serves heads/kv_heads query heads). Maps are [batch, heads, q_len, k_len]. A key
padding mask is [batch, k_len], true (or 1) for real tokens.

Density (our definition, the paper's is not available): for one query row, the smallest number
of keys whose attention sums to at least `mass` (default 0.9), divided by the number of keys the
row may attend to; a head's density is the mean over its rows. A one-hot row has density
1/keys, a uniform row about `mass`.

The bound (ours, derived in docs/theory.md): with p = softmax(z), p′ = softmax(z + δ),
d = δ − E_p[δ] and ρ = exp(d), every entry obeys

    |p′_j − p_j| ≤ u_j = min( p_j·|ρ_j − 1| + p_j·(E_p[ρ] − 1),  max(p_j, p_j·ρ_j) ),

and ‖p′ − p‖₁ ≤ min(2, Σ_j u_j, range(δ)/2). To first order Σ u_j is E_p|δ − E_pδ|, the
p-weighted spread of the logit error, which is zero for a one-hot row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "repeat_kv",
    "attention_logits",
    "key_validity",
    "attention_probs",
    "row_density",
    "density",
    "DensityAccumulator",
    "attention_map_error",
    "row_l1_error",
    "entrywise_bound",
    "perturbation_bound",
    "first_order_error",
    "explicit_bound",
    "AttentionErrorStats",
    "attention_error_stats",
]

_HEAD_CHUNK = 4  # heads processed at once where [b, h, t, t] temporaries are made
MAP_ELEMENTS = 1 << 21   # map entries (batch rows × heads × t × t) of one chunk of the error statistics


# --------------------------------------------------------------------------------------------
# maps


def repeat_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, t, kv, d] → [b, t, num_heads, d]: kv head g serves query heads g·n … g·n+n−1."""
    kv = k.shape[2]
    if num_heads % kv:
        raise ValueError(f"{num_heads} query heads cannot share {kv} kv heads evenly")
    return k if kv == num_heads else k.repeat_interleave(num_heads // kv, dim=2)


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scaled scores q·kᵀ·scale as [b, h, q_len, k_len] (scale defaults to 1/√head_dim)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [b, t, heads, d]")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = repeat_kv(k, q.shape[2])
    return torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale


def key_validity(q_len: int, k_len: int, causal: bool = True, mask: torch.Tensor | None = None,
                 device=None, window: int | None = None) -> torch.Tensor:
    """Bool [b or 1, 1, q_len, k_len]: which keys each query row may attend to.

    Causal rows are aligned at the end (query i sits at key position i + k_len − q_len).
    With a sliding `window`, a query sees only keys less than `window` positions behind it
    (the last `window` keys when causal, itself included), as in HF's sliding-window masks.
    """
    if q_len > k_len:
        raise ValueError(f"q_len {q_len} exceeds k_len {k_len}")
    valid = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        valid = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        valid = valid[None, None]
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        valid = valid & torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(k_len - q_len - window + 1)
    if mask is not None:
        if mask.ndim != 2 or mask.shape[1] != k_len:
            raise ValueError(f"mask must be [batch, {k_len}], got {tuple(mask.shape)}")
        valid = valid & mask.to(device=valid.device, dtype=torch.bool)[:, None, None, :]
    return valid


def _query_rows(q_len: int, k_len: int, mask: torch.Tensor | None, batch: int, device=None):
    """Bool [b, q_len]: query rows that are real tokens (all rows when there is no mask)."""
    if mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)[:, k_len - q_len:]


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    z = logits.masked_fill(~valid, float("-inf"))
    p = torch.softmax(z, dim=-1)
    return p.masked_fill(~valid.any(-1, keepdim=True), 0.0)  # rows with no key: all zero


def attention_probs(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                    mask: torch.Tensor | None = None, scale: float | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Float32 softmax attention maps [b, h, q_len, k_len] from post-RoPE q and k."""
    logits = attention_logits(q, k, scale)
    valid = key_validity(q.shape[1], k.shape[1], causal, mask, device=logits.device, window=window)
    return _masked_softmax(logits, valid)


# --------------------------------------------------------------------------------------------
# density


def _mass_counts(probs: torch.Tensor, mass: float, valid: torch.Tensor):
    """(keys needed to reach `mass`, keys available) per row, as float64 [..., q_len]."""
    p = probs.detach().to(torch.float64).masked_fill(~valid, 0.0)
    available = valid.expand_as(p).sum(-1).to(torch.float64)
    total = p.sum(-1, keepdim=True)
    cum = p.sort(dim=-1, descending=True).values.cumsum(-1)
    # relative tolerance so that float rounding of a uniform row does not add a spurious key
    needed = (cum < mass * total * (1 - 1e-6)).sum(-1).to(torch.float64) + 1
    needed = torch.minimum(needed, available)
    dead = (available == 0) | (total.squeeze(-1) <= 0)
    return needed.masked_fill(dead, float("nan")), available


def _check_mass(mass: float) -> None:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def _default_valid(probs: torch.Tensor, valid, causal: bool) -> torch.Tensor:
    if valid is None:
        valid = key_validity(probs.shape[-2], probs.shape[-1], causal, device=probs.device)
    return torch.broadcast_to(valid.to(device=probs.device, dtype=torch.bool), probs.shape)


def row_density(probs: torch.Tensor, mass: float = 0.9, valid: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
    """Per-row density [b, h, q_len]: (fewest keys holding ≥ `mass`) / (keys the row may see).

    `valid` (bool, broadcastable to probs) says which keys a row may attend to; without it the
    map is taken as causal (or full with causal=False). Rows with no key give NaN.
    """
    _check_mass(mass)
    valid = _default_valid(probs, valid, causal)
    out = []
    for h0 in range(0, probs.shape[1], _HEAD_CHUNK):
        sl = slice(h0, h0 + _HEAD_CHUNK)
        needed, available = _mass_counts(probs[:, sl], mass, valid[:, sl])
        out.append(needed / available)
    return torch.cat(out, dim=1)


def density(probs: torch.Tensor, mass: float = 0.9, valid: torch.Tensor | None = None,
            causal: bool = True) -> torch.Tensor:
    """Per-head density [h]: the mean of `row_density` over batch and query rows."""
    return row_density(probs, mass, valid, causal).nanmean(dim=(0, 2))


class DensityAccumulator:
    """Streaming per-layer, per-head mean density (and mean key count); keeps no maps."""

    def __init__(self, mass: float = 0.9):
        _check_mass(mass)
        self.mass = mass
        self._sum: dict[int, torch.Tensor] = {}
        self._keys: dict[int, torch.Tensor] = {}
        self._rows: dict[int, torch.Tensor] = {}

    def add(self, layer: int, probs: torch.Tensor, valid: torch.Tensor | None = None,
            causal: bool = True) -> None:
        """Fold one batch of maps [b, h, q_len, k_len] of `layer` into the running means."""
        valid = _default_valid(probs, valid, causal)
        h = probs.shape[1]
        s = torch.zeros(h, dtype=torch.float64)
        kk = torch.zeros(h, dtype=torch.float64)
        n = torch.zeros(h, dtype=torch.float64)
        for h0 in range(0, h, _HEAD_CHUNK):
            sl = slice(h0, h0 + _HEAD_CHUNK)
            needed, available = _mass_counts(probs[:, sl], self.mass, valid[:, sl])
            ok = ~needed.isnan()
            s[sl] = torch.where(ok, needed / available, 0.0).sum(dim=(0, 2)).cpu()
            kk[sl] = torch.where(ok, needed, 0.0).sum(dim=(0, 2)).cpu()
            n[sl] = ok.sum(dim=(0, 2)).to(torch.float64).cpu()
        if layer in self._sum:
            if self._sum[layer].shape[0] != h:
                raise ValueError(f"layer {layer}: {h} heads after {self._sum[layer].shape[0]}")
            self._sum[layer] += s
            self._keys[layer] += kk
            self._rows[layer] += n
        else:
            self._sum[layer], self._keys[layer], self._rows[layer] = s, kk, n

    def layers(self) -> list[int]:
        return sorted(self._sum)

    def head_density(self, layer: int) -> torch.Tensor:
        """Mean density per head [h] of `layer`."""
        return self._sum[layer] / self._rows[layer]

    def head_keys(self, layer: int) -> torch.Tensor:
        """Mean number of keys holding `mass` of each row, per head [h]."""
        return self._keys[layer] / self._rows[layer]

    def layer_density(self, layer: int) -> float:
        """Mean density of `layer` over all its rows and heads."""
        return float(self._sum[layer].sum() / self._rows[layer].sum())

    def as_tensor(self) -> torch.Tensor:
        """[layers, heads] mean densities, layers in increasing order."""
        return torch.stack([self.head_density(i) for i in self.layers()])


class SplitDensity:
    """Per-head density among one kind of keys (e.g. image tokens) against the rest, for the queries of the rest.

    A row counts when its query is not of the kind and it sees keys of both kinds. For each kind, the
    row's density is (fewest keys of that kind holding `mass` of the attention it gives that kind) /
    (keys of that kind it may see); `share` is the attention mass the row gives the kind.
    """

    def __init__(self, mass: float = 0.9):
        _check_mass(mass)
        self.mass = mass
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def add(self, probs: torch.Tensor, kind: torch.Tensor, valid: torch.Tensor | None = None,
            causal: bool = True) -> None:
        """Fold maps [b, h, t, t] of self-attention in; `kind` is bool [b, t], True for keys of the kind."""
        valid = _default_valid(probs, valid, causal)
        b, h, t, _ = probs.shape
        keys = kind.to(probs.device, torch.bool)[:, None, None, :]
        sums = {name: torch.zeros(h, dtype=torch.float64) for name in ("kind", "rest", "share")}
        rows_total = torch.zeros(h, dtype=torch.float64)
        for h0 in range(0, h, _HEAD_CHUNK):
            sl = slice(h0, h0 + _HEAD_CHUNK)
            p, v = probs[:, sl], valid[:, sl]
            inside, outside = v & keys, v & ~keys
            rows = inside.any(-1) & outside.any(-1) & ~kind.to(probs.device, torch.bool)[:, None, :]
            for name, group in (("kind", inside), ("rest", outside)):
                needed, available = _mass_counts(p, self.mass, group)
                d = (needed / available).masked_fill(~rows, 0.0).nan_to_num(0.0)
                sums[name][sl] = d.sum(dim=(0, 2)).cpu()
            share = p.to(torch.float64).masked_fill(~inside, 0.0).sum(-1).masked_fill(~rows, 0.0)
            sums["share"][sl] = share.sum(dim=(0, 2)).cpu()
            rows_total[sl] = rows.sum(dim=(0, 2)).to(torch.float64).cpu()
        for name, value in sums.items():
            self._sums[name] = self._sums.get(name, 0) + value
        self._rows = rows_total if self._rows is None else self._rows + rows_total

    @property
    def rows(self) -> int:
        return 0 if self._rows is None else int(self._rows[0])

    def per_head(self, name: str) -> torch.Tensor:
        """Mean over counted rows, per head, of "kind" / "rest" density or the "share" of mass on the kind."""
        return self._sums[name] / self._rows.clamp(min=1)


# --------------------------------------------------------------------------------------------
# measured errors


def attention_map_error(p: torch.Tensor, p2: torch.Tensor) -> float:
    """MSE(S − S′) over every entry of the maps (the paper's figure metric)."""
    if p.shape != p2.shape:
        raise ValueError(f"map shapes differ: {tuple(p.shape)} vs {tuple(p2.shape)}")
    return float(((p.double() - p2.double()) ** 2).mean())


def row_l1_error(p: torch.Tensor, p2: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """Mean over query rows of ‖p − p′‖₁ (`rows`: optional bool [b, h or 1, q_len] to include)."""
    if p.shape != p2.shape:
        raise ValueError(f"map shapes differ: {tuple(p.shape)} vs {tuple(p2.shape)}")
    err = (p.double() - p2.double()).abs().sum(-1)
    if rows is None:
        return float(err.mean())
    rows = rows.to(torch.bool).expand_as(err)
    return float(err[rows].mean())


# --------------------------------------------------------------------------------------------
# our bound


def _centred(p: torch.Tensor, delta: torch.Tensor, valid: torch.Tensor | None):
    """float64 (p renormalised on its support, d = δ − E_p δ on the support, support mask)."""
    p = p.detach().to(torch.float64)
    delta = delta.detach().to(torch.float64)
    p, delta = torch.broadcast_tensors(p, delta)
    support = p > 0
    if valid is not None:
        support = support & valid.to(device=p.device, dtype=torch.bool)
    p = torch.where(support, p, 0.0)
    total = p.sum(-1, keepdim=True)
    p = p / torch.where(total > 0, total, 1.0)
    dz = torch.where(support, delta, 0.0)
    if not torch.isfinite(dz).all():
        raise ValueError("delta must be finite on the keys a row attends to")
    d = torch.where(support, dz - (p * dz).sum(-1, keepdim=True), 0.0)
    return p, d, support


def entrywise_bound(p: torch.Tensor, delta: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """u with |softmax(z+δ)_j − p_j| ≤ u_j for p = softmax(z) (float64, same shape as p).

    u_j = min(p_j|ρ_j − 1| + p_j(E_p ρ − 1), max(p_j, p_j ρ_j)), ρ = exp(δ − E_p δ); keys
    outside `valid` (or with p_j = 0) get 0.
    """
    p, d, support = _centred(p, delta, valid)
    logp = torch.where(support, p, 1.0).log()
    a = torch.where(support, torch.exp(logp + d), 0.0)  # p_j·ρ_j, computed without overflow
    e_rho = a.sum(-1, keepdim=True)                      # E_p ρ ≥ 1 (Jensen)
    tilt = (a - p).abs() + torch.where(support, p * (e_rho - 1.0).clamp_min(0.0), 0.0)
    return torch.where(support, torch.minimum(tilt, torch.maximum(p, a)), 0.0)


def _l1_from_u(u: torch.Tensor, d: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    big, small = torch.finfo(d.dtype).max, torch.finfo(d.dtype).min
    spread = (torch.where(support, d, small).amax(-1) - torch.where(support, d, big).amin(-1))
    spread = torch.where(support.any(-1), spread, 0.0)
    return torch.minimum(u.sum(-1), spread / 2).clamp_max(2.0)


def perturbation_bound(p: torch.Tensor, delta: torch.Tensor, valid: torch.Tensor | None = None,
                       norm: str = "l1") -> torch.Tensor:
    """Per-row upper bound on ‖softmax(z+δ) − softmax(z)‖ given p = softmax(z) and δ.

    norm="l1": min(2, Σ_j u_j, range(δ)/2); norm="l2": √min(Σ u_j², B₁²/2, max_j u_j·B₁)
    with B₁ the l1 bound. Rigorous (not first order); float64, shape p.shape[:-1].
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    p64, d, support = _centred(p, delta, valid)
    u = entrywise_bound(p, delta, valid)
    b1 = _l1_from_u(u, d, support)
    if norm == "l1":
        return b1
    sq = torch.minimum((u**2).sum(-1), b1**2 / 2)
    sq = torch.minimum(sq, u.amax(-1) * b1)
    return sq.sqrt()


def first_order_error(p: torch.Tensor, delta: torch.Tensor,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """E_p|δ − E_p δ| per row: the linearised l1 error ‖(diag p − ppᵀ)δ‖₁."""
    p, d, _ = _centred(p, delta, valid)
    return (p * d.abs()).sum(-1)


def explicit_bound(p: torch.Tensor, delta: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The readable (looser) l1 form: exp(M⁺)·(E_p|d| + ½ E_p d²), M⁺ = max(0, max_j d_j)."""
    p, d, support = _centred(p, delta, valid)
    m_plus = torch.where(support, d, 0.0).amax(-1).clamp_min(0.0)
    return torch.exp(m_plus) * ((p * d.abs()).sum(-1) + 0.5 * (p * d**2).sum(-1))


# --------------------------------------------------------------------------------------------
# layer level: measured error next to the bound


@dataclass
class AttentionErrorStats:
    """Per-head sums over query rows for one layer; add batches with `+`.

    Measured errors compare float64 maps of the original and compressed q/k; MSE is over every
    entry of the valid query rows (masked keys included, as zeros in both maps).
    """

    rows: int = 0                     # query rows per head
    entries: int = 0                  # rows × k_len, per head
    sse: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sse_bound: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    l1: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    l1_bound: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    l1_first_order: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    density: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    _SUMS = ("sse", "sse_bound", "l1", "l1_bound", "l1_first_order", "density")

    def __add__(self, other: AttentionErrorStats) -> AttentionErrorStats:
        if self.rows == 0:
            return other
        if other.rows == 0:
            return self
        if self.sse.shape != other.sse.shape:
            raise ValueError("cannot add stats of layers with different head counts")
        sums = {k: getattr(self, k) + getattr(other, k) for k in self._SUMS}
        return AttentionErrorStats(self.rows + other.rows, self.entries + other.entries, **sums)

    @property
    def mse(self) -> float:
        return float(self.sse.sum() / (self.entries * self.sse.numel()))

    @property
    def mse_bound(self) -> float:
        return float(self.sse_bound.sum() / (self.entries * self.sse.numel()))

    @property
    def mean_row_l1(self) -> float:
        return float(self.l1.sum() / (self.rows * self.l1.numel()))

    @property
    def mean_row_l1_bound(self) -> float:
        return float(self.l1_bound.sum() / (self.rows * self.l1.numel()))

    @property
    def mean_row_l1_first_order(self) -> float:
        return float(self.l1_first_order.sum() / (self.rows * self.l1.numel()))

    def head_mse(self) -> torch.Tensor:
        return self.sse / self.entries

    def head_mse_bound(self) -> torch.Tensor:
        return self.sse_bound / self.entries

    def head_density(self) -> torch.Tensor:
        return self.density / self.rows


def _error_sums(out: dict, sl: slice, q, kr, q2, k2r, valid, rows, scale, mass) -> None:
    """Add one chunk's (batch rows × heads `sl`) per-head sums of the map errors, bounds and density to `out`."""
    z = attention_logits(q[:, :, sl], kr[:, :, sl], scale, dtype=torch.float64)
    z2 = attention_logits(q2[:, :, sl], k2r[:, :, sl], scale, dtype=torch.float64)
    p, p2 = _masked_softmax(z, valid), _masked_softmax(z2, valid)
    delta = torch.where(valid, z2 - z, 0.0)
    r = rows[:, None, :]
    diff = p2 - p
    u = entrywise_bound(p, delta, valid)
    _, d, support = _centred(p, delta, valid)
    b1 = _l1_from_u(u, d, support)
    b2sq = torch.minimum(torch.minimum((u**2).sum(-1), b1**2 / 2), u.amax(-1) * b1)
    needed, available = _mass_counts(p, mass, valid)
    per_row = {
        "sse": (diff**2).sum(-1),
        "sse_bound": b2sq,
        "l1": diff.abs().sum(-1),
        "l1_bound": b1,
        "l1_first_order": (p * d.abs()).sum(-1),
        "density": needed / available,
    }
    for name, val in per_row.items():
        out[name][sl] += torch.where(r, val, 0.0).sum(dim=(0, 2)).cpu()


def attention_error_stats(q: torch.Tensor, k: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                          causal: bool = True, mask: torch.Tensor | None = None,
                          scale: float | None = None, mass: float = 0.9,
                          window: int | None = None) -> AttentionErrorStats:
    """Measured map error of (q2, k2) against (q, k), our bound on it, and density, per head.

    δ = (q′k′ᵀ − qkᵀ)·scale. Works head-chunk by head-chunk in float64, keeping no maps.
    """
    if q.shape != q2.shape or k.shape != k2.shape:
        raise ValueError("original and compressed q/k must have the same shapes")
    _check_mass(mass)
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    kr, k2r = repeat_kv(k, h), repeat_kv(k2, h)
    valid = key_validity(tq, tk, causal, mask, device=q.device, window=window)
    rows = _query_rows(tq, tk, mask, b, device=q.device)  # [b, tq]
    rows = rows & valid.expand(b, 1, tq, tk).any(-1)[:, 0]
    n_rows = int(rows.sum())
    out = {name: torch.zeros(h, dtype=torch.float64) for name in AttentionErrorStats._SUMS}
    step = max(1, MAP_ELEMENTS // (_HEAD_CHUNK * tq * tk))
    for b0 in range(0, b, step):
        bs = slice(b0, b0 + step)
        vb = valid[bs] if valid.shape[0] == b else valid
        for h0 in range(0, h, _HEAD_CHUNK):
            _error_sums(out, slice(h0, h0 + _HEAD_CHUNK), q[bs], kr[bs], q2[bs], k2r[bs], vb, rows[bs], scale, mass)
    return AttentionErrorStats(n_rows, n_rows * tk, **out)
