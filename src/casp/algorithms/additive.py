"""Additive vector quantization (AQLM, Egiazarian et al., 2024) of a weight matrix under the proxy loss.

Every run of g consecutive input weights of output row r is approximated as

    ŵ_{r,grp} = s_r · Σ_{m<M} C_m[b_{r,grp,m}],

with M codebooks C_m of K = 2^B vectors of dimension g and one scale s_r per output row. The loss is
the layer-output error ‖(W − Ŵ)X‖² = Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r), H = XᵀX (n × n, n inputs).

Everything here is a plain tensor function:

- `init_codebooks`: residual k-means on the row-scaled groups (M rounds of k-means on what the
  previous codebooks left), seeded; it also gives the initial codes.
- `beam_search`: codes of every row by exact coordinate search on the H-objective. Positions
  (group, codebook) are visited group-major; at each one, every hypothesis of the beam tries all K
  codes and the objective change of each is exact (it uses H(ŵ − w), kept up to date, and the
  diagonal block H_grp,grp). The best `beam` hypotheses survive; one slot follows the greedy
  lineage, so the result is never worse than `beam=1` (plain greedy coordinate descent).
- `update_codebooks`: the objective is quadratic in the codebook entries; their normal equations
  (Σ_r s_r² Pᵣᵀ H Pᵣ) C = Σ_r s_r Pᵣᵀ H w_r are solved by block-Jacobi preconditioned conjugate
  gradients from the current codebooks, with a proximal ridge λ‖C − C_old‖². The (fp16-rounded)
  result is kept only if it lowers the objective.
- `update_scales`: the exact per-row least-squares scale, rounded to fp16, kept per row if better.
- `finetune`: optional Adam steps on codebooks and scales jointly (codes frozen), best iterate kept.
- `quantize_additive`: the alternation driver, deterministic under its seed.

Codebooks and scales are kept fp16-exact (they are stored as fp16), so the codes are searched
against exactly what will be stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.algorithms.hessian import prepare_hessian

FP16_TINY = 2.0 ** -24
FP16_MAX = 65504.0


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to fp16 (finite range), back in float32."""
    return t.clamp(-FP16_MAX, FP16_MAX).half().float()


def positive_fp16(t: torch.Tensor) -> torch.Tensor:
    """Positive fp16-exact values (scales): clamped to [2^-24, 65504]."""
    return t.clamp(FP16_TINY, FP16_MAX).half().float()


def pad_inputs(w: torch.Tensor, h: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of W up to a multiple of g inputs; H gets mean(diag H)·I on the padding."""
    n = w.shape[1]
    pad = -n % g
    if not pad:
        return w, h
    w = torch.nn.functional.pad(w, (0, pad))
    hp = torch.zeros(n + pad, n + pad, dtype=h.dtype, device=h.device)
    hp[:n, :n] = h
    mean = float(h.diagonal().mean()) if n else 1.0
    hp[n:, n:] = (mean if mean > 0 else 1.0) * torch.eye(pad, dtype=h.dtype, device=h.device)
    return w, hp


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """V (rows, G·g) = Σ_m C_m[codes[:, :, m]], summed in codebook order (float32)."""
    rows, groups, m_count = codes.shape
    idx = codes.long()
    v = codebooks[0][idx[:, :, 0]]
    for m in range(1, m_count):
        v = v + codebooks[m][idx[:, :, m]]
    return v.reshape(rows, -1)


def row_losses(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(w_r − ŵ_r)ᵀ H (w_r − ŵ_r) per row (rows,) float64; the product with H in `dtype`."""
    d = what.to(dtype) - w.to(dtype)
    return ((d @ h.to(dtype)).double() * d.double()).sum(1)


def objective(w: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              h: torch.Tensor) -> float:
    """Σ_r (w_r − s_r v_r)ᵀ H (w_r − s_r v_r), v = `reconstruct(codes, codebooks)` (product with H in
    float32, sums in float64)."""
    v = reconstruct(codes, codebooks)
    return float(row_losses(w, scales[:, None] * v, h).sum())


# ---------------------------------------------------------------------------------------------
# initialisation


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           max_points: int | None = None, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means: centroids (k, d) and the assignment (N,) of every point.

    Starts from k distinct random points (with repetition when there are fewer than k points);
    centroids are fitted on at most `max_points` random points, then every point is assigned.
    An empty cluster keeps its centroid.
    """
    n, d = points.shape
    if n == 0:
        return points.new_zeros(k, d), torch.zeros(0, dtype=torch.long, device=points.device)
    fit = points
    if max_points is not None and n > max_points:
        fit = points[torch.randperm(n, generator=generator)[:max_points].to(points.device)]
    start = (torch.randperm(fit.shape[0], generator=generator)[:k] if fit.shape[0] >= k
             else torch.randint(fit.shape[0], (k,), generator=generator))
    centroids = fit[start.to(points.device)].clone()
    for _ in range(iters):
        assign = nearest(fit, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, fit)
        counts = torch.bincount(assign, minlength=k).to(fit.dtype)
        used = counts > 0
        centroids[used] = sums[used] / counts[used, None]
    return centroids, nearest(points, centroids, chunk)


def nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of every point, (N,) int64."""
    norms = (centroids * centroids).sum(1)
    out = [torch.addmm(norms, points[s:s + chunk], centroids.T, alpha=-2.0).argmin(1)
           for s in range(0, points.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=points.device)


def init_codebooks(w_scaled: torch.Tensor, num_codebooks: int, codebook_bits: int, group_size: int, *,
                   iters: int = 8, seed: int = 0, max_points: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means on the groups of the row-scaled weight (rows, n), n a multiple of g.

    Codebook m is k-means (K = 2^B centroids) of what codebooks < m leave. Centroids are fitted on at
    most `max_points`·K groups. Returns fp16-exact codebooks (M, K, g) and codes (rows, n/g, M) int64.
    """
    rows, n = w_scaled.shape
    g, k = group_size, 1 << codebook_bits
    gen = torch.Generator().manual_seed(seed)
    resid = w_scaled.reshape(-1, g).float().clone()
    books, codes = [], []
    for _ in range(num_codebooks):
        c, a = kmeans(resid, k, iters, gen, None if max_points is None else max_points * k)
        c = fp16_round(c)
        resid -= c[a]
        books.append(c)
        codes.append(a)
    return torch.stack(books), torch.stack(codes, 1).reshape(rows, n // g, num_codebooks)


# ---------------------------------------------------------------------------------------------
# codes: beam search


def _diag_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The (G, g, g) diagonal blocks of H."""
    groups = h.shape[0] // g
    return h.reshape(groups, g, groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def beam_search(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scales: torch.Tensor, beam: int = 4, *, block_groups: int = 8,
                row_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of beam search over all (group, codebook) positions of every row, from `codes`.

    w (rows, n), h (n, n) float32 (the objective's H), codes (rows, G, M), codebooks (M, K, g),
    scales (rows,). Returns the new codes (rows, G, M) int64 and the float64 row losses of them.
    The best hypothesis is never worse than the start (its codes are among the candidates) nor than
    `beam=1` from the same start (slot 0 of the beam follows the greedy lineage).
    """
    rows, n = w.shape
    m_count, k_count, g = codebooks.shape
    if n % g or codes.shape != (rows, n // g, m_count):
        raise ValueError(f"codes {tuple(codes.shape)} do not fit W {tuple(w.shape)} with groups of {g}")
    hd = _diag_blocks(h, g)
    # q[grp, m, k] = c_mkᵀ H_grp,grp c_mk: the quadratic term of a codeword in a group
    q = torch.einsum("mka,gab,mkb->gmk", codebooks, hd, codebooks)
    out_codes = torch.empty(rows, n // g, m_count, dtype=torch.long, device=w.device)
    out_loss = torch.empty(rows, dtype=torch.float64, device=w.device)
    if row_block is None:   # about 64 MB of per-hypothesis H(ŵ − w) at a time
        row_block = max(64, (1 << 24) // (max(1, beam) * max(1, n)))
    for r0 in range(0, rows, row_block):
        r1 = min(r0 + row_block, rows)
        out_codes[r0:r1], out_loss[r0:r1] = _beam_rows(w[r0:r1], h, codes[r0:r1].long(), codebooks, scales[r0:r1],
                                                        beam, block_groups, hd, q)
    return out_codes, out_loss


def _row_min(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, argmin) of each row of x (rows, width), both (rows, 1). Two levels (block minima first):
    torch's min-with-index is several times slower than a plain `amin` on wide rows."""
    rows, width = x.shape
    if width < 4 * block or width % block:
        return x.min(1, keepdim=True)
    blocks = x.view(rows, -1, block)
    value, which = blocks.amin(2).min(1, keepdim=True)
    inner = blocks[torch.arange(rows, device=x.device), which[:, 0]].argmin(1, keepdim=True)
    return value, which * block + inner


def _beam_rows(w, h, codes, books, s, beam, block_groups, hd, q):
    """`beam_search` on one block of rows. Hypotheses are flattened as row·beam + slot."""
    rows, n = w.shape
    m_count, k_count, g = books.shape
    groups = n // g
    kb = max(1, beam)
    hyps = rows * kb
    d = s[:, None] * reconstruct(codes, books) - w
    grad = d @ h                                            # H(ŵ − w) per row at the pass start
    loss = torch.full((rows, kb), float("inf"), device=w.device)
    loss[:, 0] = (grad * d).sum(1)
    base = grad.repeat_interleave(kb, 0)                    # H(ŵ − w) from the block start on, per hypothesis
    s3, s2 = s[:, None, None], (s * s)[:, None]
    ar = torch.arange(rows, device=w.device)
    first = (ar * kb)[:, None]
    inf = float("inf")
    parents, choices = [], []
    for b0 in range(0, groups, block_groups):
        b1 = min(b0 + block_groups, groups)
        c0, c1 = b0 * g, b1 * g
        delta = torch.zeros(hyps, c1 - c0, device=w.device)  # change of ŵ − w inside the block
        root = torch.arange(hyps, device=w.device)          # the hypothesis at the block start of each slot
        h_blk = h[c0:c1, c0:c1]
        for grp in range(b0, b1):
            j0 = (grp - b0) * g
            grad_g = base[root, j0:j0 + g]
            if j0:
                grad_g = grad_g.addmm(delta[:, :j0], h_blk[:j0, j0:j0 + g])
            for m in range(m_count):
                c_old = books[m][codes[:, grp, m]]          # (rows, g): the same in every hypothesis
                hc_old = c_old @ hd[grp]
                g3 = grad_g.view(rows, kb, g)
                u = 2.0 * s3 * (g3 - s3 * hc_old[:, None, :])
                const = s2 * (hc_old * c_old).sum(1, keepdim=True) - 2.0 * s[:, None] * (g3 * c_old[:, None, :]).sum(-1)
                scores = (u.reshape(hyps, g) @ books[m].T).view(rows, kb, k_count)
                scores += (loss + const).unsqueeze(-1)
                scores += s2[:, :, None] * q[grp, m]
                if kb == 1:
                    new_loss, pick = _row_min(scores[:, 0])
                    parent = None
                else:
                    flat = scores.view(rows, kb * k_count)
                    best_v, best_i = _row_min(flat[:, :k_count])    # slot 0: the greedy lineage
                    vals, idxs = [best_v], [best_i]
                    for _ in range(kb - 1):
                        flat.scatter_(1, idxs[-1], inf)
                        best_v, best_i = _row_min(flat)
                        vals.append(best_v)
                        idxs.append(best_i)
                    new_loss = torch.cat(vals, 1)
                    pick = torch.cat(idxs, 1)
                    parent = pick // k_count
                    pick = pick % k_count
                    sel = (first + parent).reshape(-1)
                    delta = delta.index_select(0, sel)
                    root = root.index_select(0, sel)
                    grad_g = grad_g.index_select(0, sel)
                step = (s3 * (books[m][pick] - c_old[:, None, :])).reshape(hyps, g)
                delta[:, j0:j0 + g] += step
                grad_g = grad_g.addmm(step, hd[grp])
                loss = new_loss
                parents.append(parent)
                choices.append(pick)
        if c1 < n:
            base = base[:, c1 - c0:].index_select(0, root).addmm_(delta, h[c0:c1, c1:])
    slot = loss.argmin(1)
    new_codes = torch.empty_like(codes)
    step_id = len(choices)
    for grp in reversed(range(groups)):
        for m in reversed(range(m_count)):
            step_id -= 1
            new_codes[:, grp, m] = choices[step_id][ar, slot]
            if parents[step_id] is not None:
                slot = parents[step_id][ar, slot]
    final = s[:, None] * reconstruct(new_codes, books)
    return new_codes, row_losses(w, final, h)


# ---------------------------------------------------------------------------------------------
# codebooks and scales


def _scatter_groups(y: torch.Tensor, idx: torch.Tensor, m_count: int, k_count: int, g: int) -> torch.Tensor:
    """Σ over (row, group) of y's group vectors into the codebook entries they use: (M, K, g)."""
    rows = y.shape[0]
    src = y.reshape(rows, -1, 1, g).expand(rows, y.shape[1] // g, m_count, g).reshape(-1, g)
    return (torch.zeros(m_count * k_count, g, dtype=y.dtype, device=y.device).index_add_(0, idx, src)
            .reshape(m_count, k_count, g))


def update_codebooks(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor, *, iters: int = 4, ridge: float = 1e-4,
                     loss: float | None = None) -> tuple[torch.Tensor, float]:
    """Codebooks (M, K, g) minimising the objective for fixed codes and scales; never a worse objective.

    Preconditioned conjugate gradients on the normal equations plus λ‖C − C_old‖² (λ = `ridge` ·
    the mean diagonal of the preconditioner), from the current codebooks. The preconditioner is
    block-Jacobi: per entry, Σ s_r² H_grp,grp over the (row, group) that use it. The result is
    rounded to fp16 and returned with its `objective` only if that is lower than the current one
    (`loss`, computed when not given); otherwise the input comes back.
    """
    rows, n = w.shape
    m_count, k_count, g = codebooks.shape
    groups = n // g
    if loss is None:
        loss = objective(w, codes, codebooks, scales, h)
    device = w.device
    idx = (codes.long() + torch.arange(m_count, device=device) * k_count).reshape(-1)
    s = scales[:, None]

    def apply(p):   # (Σ_r s_r² Pᵣᵀ H Pᵣ) p
        return _scatter_groups((s * s * reconstruct(codes, p)) @ h, idx, m_count, k_count, g)

    resid = -_scatter_groups(s * ((s * reconstruct(codes, codebooks) - w) @ h), idx, m_count, k_count, g)
    cell = (idx.reshape(rows, groups, m_count) * groups + torch.arange(groups, device=device)[None, :, None]).reshape(-1)
    s2 = (scales * scales).double()[:, None, None].expand(rows, groups, m_count).reshape(-1)
    weight = torch.bincount(cell, weights=s2, minlength=m_count * k_count * groups).float()
    weight = weight.reshape(m_count * k_count, groups)
    diag = (weight @ _diag_blocks(h, g).reshape(groups, g * g)).reshape(m_count * k_count, g, g)
    lam = ridge * float(diag.diagonal(dim1=1, dim2=2).mean()) if diag.numel() else ridge
    lam = lam if lam > 0 else 1e-12
    eye = torch.eye(g, device=device)
    precond = torch.linalg.inv(diag + lam * eye)

    def pre(r):
        return (precond @ r.reshape(-1, g, 1)).reshape(m_count, k_count, g)

    x = codebooks.clone()
    z = pre(resid)
    p = z.clone()
    rz = float((resid * z).sum())
    for _ in range(iters):
        if rz <= 0:
            break
        ap = apply(p) + lam * p
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        resid -= alpha * ap
        z = pre(resid)
        rz_new = float((resid * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    x = fp16_round(x)
    new_loss = objective(w, codes, x, scales, h)
    if new_loss < loss:
        return x, new_loss
    return codebooks, loss


def update_scales(w: torch.Tensor, h: torch.Tensor, v: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares scales s_r = v_rᵀHw_r / v_rᵀHv_r, fp16-rounded; a row keeps its old scale
    when that is no worse."""
    vh = (v @ h).double()
    a = (vh * v.double()).sum(1)
    b = (vh * w.double()).sum(1)
    new = positive_fp16((b / a.clamp_min(1e-30)).float())
    old = scales.double()
    nd = new.double()
    better = nd * nd * a - 2 * nd * b < old * old * a - 2 * old * b
    return torch.where(better, new, scales)


def finetune(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
             steps: int, lr: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adam on codebooks and log-scales together (codes frozen) on the H-objective.

    The iterate with the lowest objective seen is rounded to fp16 and returned with its exact objective
    if that beats the input; otherwise the input comes back (with its objective).
    """
    start = objective(w, codes, codebooks, scales, h)
    if steps <= 0:
        return codebooks, scales, start
    c = codebooks.clone().requires_grad_(True)
    log_s = scales.clamp_min(FP16_TINY).log().clone().requires_grad_(True)
    opt = torch.optim.Adam([c, log_s], lr=lr, betas=(0.9, 0.95))
    norm = start or 1.0
    best_f, best = float("inf"), None
    for step in range(steps + 1):
        opt.zero_grad()
        d = log_s.exp()[:, None] * reconstruct(codes, c) - w
        f = ((d @ h) * d).sum() / norm
        value = float(f.detach())
        if step and value < best_f:
            best_f, best = value, (c.detach().clone(), log_s.detach().clone())
        if step == steps:
            break
        f.backward()
        opt.step()
    if best is None:
        return codebooks, scales, start
    cand_c, cand_s = fp16_round(best[0]), positive_fp16(best[1].exp())
    value = objective(w, codes, cand_c, cand_s, h)
    return (cand_c, cand_s, value) if value < start else (codebooks, scales, start)


# ---------------------------------------------------------------------------------------------
# driver


@dataclass
class AdditiveMatrix:
    """One quantized matrix: codes (out, G, M) int64 of the padded columns, fp16-exact codebooks
    (M, K, g) and scales (out,), Ŵ (out × in, float32), its proxy loss on the undamped H, and the loss
    after each stage (on the damped H the search used)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor
    loss: float
    history: list[tuple[str, float]]


def quantize_additive(w: torch.Tensor, h: torch.Tensor | None, num_codebooks: int, codebook_bits: int,
                      group_size: int, *, beam: int = 4, rounds: int = 4, cg_iters: int = 4, ridge: float = 1e-4,
                      damp: float = 0.01, kmeans_iters: int = 8, finetune_steps: int = 0, finetune_lr: float = 1e-3,
                      seed: int = 0) -> AdditiveMatrix:
    """AQLM-style codes of W (out × in) under tr((W − Ŵ) H (W − Ŵ)ᵀ), deterministic under `seed`.

    Scales start at the row RMS; codebooks and codes from residual k-means of W/s; then `rounds`
    rounds of [codebook least squares, scale least squares, one beam-search pass] on H damped by
    `damp`·mean(diag H), and a last codebook+scale fit to the final codes; then `finetune_steps` Adam
    steps and, if they helped, one more beam pass and fit. No stage increases the (damped) objective.
    `h=None` means H = I.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = group_size
    h = torch.eye(in_f, device=w.device) if h is None else h
    if h.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(h.shape)}, expected {(in_f, in_f)}")
    h64 = h.detach().to(torch.float64)
    w32 = w.detach().float()
    wp, hp = pad_inputs(w32, h64, g)
    dead = hp.diagonal() == 0
    if bool(dead.any()):   # inputs that never fire: their weights are free, code them as zeros
        wp = wp.clone()
        wp[:, dead] = 0.0
    hs = prepare_hessian(hp, damp).float()
    scales = positive_fp16(wp.pow(2).mean(1).sqrt())
    books, codes = init_codebooks(wp / scales[:, None], num_codebooks, codebook_bits, g, iters=kmeans_iters,
                                  seed=seed)
    loss = objective(wp, codes, books, scales, hs)
    history = [("init", loss)]

    def refit(codes, books, scales, loss):
        books, loss = update_codebooks(wp, hs, codes, books, scales, iters=cg_iters, ridge=ridge, loss=loss)
        scales = update_scales(wp, hs, reconstruct(codes, books), scales)
        loss = objective(wp, codes, books, scales, hs)
        history.append(("codebooks+scales", loss))
        return books, scales, loss

    for _ in range(rounds):
        books, scales, loss = refit(codes, books, scales, loss)
        codes, rl = beam_search(wp, hs, codes, books, scales, beam)
        loss = float(rl.sum())
        history.append(("beam", loss))
    if rounds:
        books, scales, loss = refit(codes, books, scales, loss)
    if finetune_steps > 0:
        books, scales, tuned = finetune(wp, hs, codes, books, scales, finetune_steps, finetune_lr)
        history.append(("finetune", tuned))
        if tuned < loss:
            codes, rl = beam_search(wp, hs, codes, books, scales, beam)
            history.append(("beam", float(rl.sum())))
            books, scales, loss = refit(codes, books, scales, float(rl.sum()))
    weight = (scales[:, None] * reconstruct(codes, books))[:, :in_f].contiguous()
    final = float(row_losses(w32, weight, h64, torch.float64).sum())
    return AdditiveMatrix(codes, books, scales, weight, final, history)
