"""Additive (AQLM-style) quantization: exact beam search, monotone codebook/scale updates, determinism."""
import pytest
import torch

from casp.algorithms import additive as A
from random_problems import weight_and_xtx


pytestmark = pytest.mark.usefixtures("one_torch_thread")


problem = weight_and_xtx


def start(w, h, m, b, g, seed=0, noise=0.3):
    """Row-RMS scales and residual k-means codebooks, perturbed so that the codes are far from optimal."""
    s = A.positive_fp16(w.pow(2).mean(1).sqrt())
    books, codes = A.init_codebooks(w / s[:, None], m, b, g, iters=3, seed=seed)
    books = A.fp16_round(books + noise * torch.randn(books.shape, generator=torch.Generator().manual_seed(seed)))
    return books, codes, s


def reference_beam(w, h, codes, books, s, beam):
    """Beam search by full re-evaluation of the objective of every candidate (slow)."""
    rows = w.shape[0]
    m_count, k_count, _ = books.shape
    out = torch.empty_like(codes)
    for r in range(rows):
        def loss(c):
            d = (s[r] * A.reconstruct(c[None], books)[0] - w[r]).double()
            return float(d @ h.double() @ d)

        hyps = [(loss(codes[r]), codes[r].clone())]
        for grp in range(codes.shape[1]):
            for m in range(m_count):
                cands = []
                for parent, (_, c) in enumerate(hyps):
                    for k in range(k_count):
                        c2 = c.clone()
                        c2[grp, m] = k
                        cands.append((loss(c2), parent, c2))
                greedy = min((x for x in cands if x[1] == 0), key=lambda x: x[0])
                rest = sorted((x for x in cands if x is not greedy), key=lambda x: x[0])[:beam - 1]
                hyps = [(x[0], x[2]) for x in [greedy] + rest]
        out[r] = min(hyps, key=lambda x: x[0])[1]
    return out


def test_row_min_matches_min_with_ties():
    x = torch.randn(7, 512)
    x[3, 100] = x[3, 300] = x[3].min() - 1
    v, i = A._row_min(x)
    ref_v, ref_i = x.min(1, keepdim=True)
    assert torch.equal(v, ref_v)
    assert torch.equal(x.gather(1, i), ref_v) and int(i[3]) == 100


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_equals_exhaustive_reevaluation(beam):
    w, h = problem(4, 12, seed=beam)
    books, codes, s = start(w, h, 2, 3, 4, seed=beam)
    new, losses = A.beam_search(w, h, codes, books, s, beam, block_groups=2)
    ref = reference_beam(w, h, codes, books, s, beam)
    assert torch.equal(new, ref)
    torch.testing.assert_close(losses, A.row_losses(w, s[:, None] * A.reconstruct(ref, books), h))


@pytest.mark.parametrize("seed", range(4))
def test_beam_never_worse_than_greedy_nor_the_start(seed):
    w, h = problem(48, 64, seed=seed)
    books, codes, s = start(w, h, 2, 6, 8, seed=seed)
    before = A.row_losses(w, s[:, None] * A.reconstruct(codes, books), h)
    _, greedy = A.beam_search(w, h, codes, books, s, 1)
    for beam in (2, 4, 8):
        _, beamed = A.beam_search(w, h, codes, books, s, beam, block_groups=3)
        assert bool((beamed <= greedy * (1 + 1e-5) + 1e-9).all())
        assert bool((beamed <= before * (1 + 1e-5) + 1e-9).all())
        assert float(beamed.sum()) < float(greedy.sum())


def test_row_blocks_do_not_change_the_answer():
    w, h = problem(40, 32, seed=5)
    books, codes, s = start(w, h, 2, 4, 8, seed=5)
    a = A.beam_search(w, h, codes, books, s, 4)
    b = A.beam_search(w, h, codes, books, s, 4, row_block=7, block_groups=1)
    assert torch.equal(a[0], b[0])


def test_codebook_update_reaches_least_squares():
    rows, n, m, b, g = 30, 24, 2, 3, 4
    w, h = problem(rows, n)
    books, codes, s = start(w, h, m, b, g)
    k = 1 << b
    p = torch.zeros(rows, n, m * k * g, dtype=torch.float64)
    for r in range(rows):
        for grp in range(n // g):
            for j in range(m):
                for a in range(g):
                    p[r, grp * g + a, (j * k + int(codes[r, grp, j])) * g + a] = 1
    hd, sd, wd = h.double(), s.double(), w.double()
    lhs = sum(sd[r] ** 2 * p[r].T @ hd @ p[r] for r in range(rows))
    rhs = sum(sd[r] * p[r].T @ hd @ wd[r] for r in range(rows))
    best = A.objective(w, codes, (torch.linalg.pinv(lhs, hermitian=True) @ rhs).float().reshape(m, k, g), s, h)
    before = A.objective(w, codes, books, s, h)
    new, loss = A.update_codebooks(w, h, codes, books, s, iters=30, ridge=1e-8)
    assert loss == pytest.approx(A.objective(w, codes, new, s, h), rel=1e-12)
    assert torch.equal(new, new.half().float())
    assert loss < before and loss == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_codebook_and_scale_updates_never_increase_the_objective(seed):
    w, h = problem(32, 48, seed=seed)
    books, codes, s = start(w, h, 2, 4, 8, seed=seed, noise=0.0)
    loss = A.objective(w, codes, books, s, h)
    for iters in (1, 3, 10):
        books, new = A.update_codebooks(w, h, codes, books, s, iters=iters, loss=loss)
        assert new <= loss and new == pytest.approx(A.objective(w, codes, books, s, h), rel=1e-12)
        loss = new
        s2 = A.update_scales(w, h, A.reconstruct(codes, books), s)
        assert torch.equal(s2, s2.half().float())
        new = A.objective(w, codes, books, s2, h)
        assert new <= loss * (1 + 1e-6)
        s, loss = s2, new
    tuned_books, tuned_s, tuned = A.finetune(w, h, codes, books, s, steps=5, lr=1e-2)
    assert tuned <= loss and tuned == pytest.approx(A.objective(w, codes, tuned_books, tuned_s, h), rel=1e-12)


def test_kmeans_init_is_seeded():
    w, _ = problem(16, 32)
    a = A.init_codebooks(w, 2, 4, 8, seed=1)
    b = A.init_codebooks(w, 2, 4, 8, seed=1)
    c = A.init_codebooks(w, 2, 4, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (2, 16, 8) and a[1].shape == (16, 4, 2)


def test_quantize_additive_is_deterministic_and_improves_each_stage():
    w, h = problem(24, 36, seed=3)
    kw = dict(beam=2, rounds=2, seed=7)
    r1 = A.quantize_additive(w, h, 2, 4, 8, **kw)
    r2 = A.quantize_additive(w, h, 2, 4, 8, **kw)
    assert torch.equal(r1.codes, r2.codes) and torch.equal(r1.codebooks, r2.codebooks)
    assert torch.equal(r1.scales, r2.scales) and torch.equal(r1.weight, r2.weight) and r1.loss == r2.loss
    losses = [v for _, v in r1.history]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))
    assert r1.weight.shape == (24, 36) and r1.codes.shape == (24, 5, 2)    # 36 inputs padded to 40
    assert r1.loss == pytest.approx(A.row_losses(w, r1.weight, h, torch.float64).sum().item(), rel=1e-12)
    assert r1.loss < 0.5 * A.row_losses(w, torch.zeros_like(w), h).sum().item()


def test_without_xtx_is_plain_mse():
    w, _ = problem(16, 32)
    r = A.quantize_additive(w, None, 2, 4, 8, rounds=1, damp=0.0)
    assert r.loss == pytest.approx(float((w.double() - r.weight.double()).pow(2).sum()), rel=1e-9)


def test_finetune_steps_never_hurt():
    w, h = problem(24, 32, seed=4)
    plain = A.quantize_additive(w, h, 2, 4, 8, rounds=1)
    tuned = A.quantize_additive(w, h, 2, 4, 8, rounds=1, finetune_steps=20, finetune_lr=1e-2)
    assert "finetune" in [name for name, _ in tuned.history]
    assert tuned.history[-1][1] <= plain.history[-1][1]


def test_dead_inputs_are_coded_as_zeros():
    w, h = problem(16, 32, seed=6)
    h[:, 5] = 0.0
    h[5, :] = 0.0
    r = A.quantize_additive(w, h, 2, 4, 8, rounds=1)
    assert bool(torch.isfinite(r.weight).all())
    assert r.loss == pytest.approx(A.row_losses(w, r.weight, h, torch.float64).sum().item(), rel=1e-12)
