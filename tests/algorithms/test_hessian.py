"""One `prepare_hessian` for GPTQ, BlockLDLQ (E8) and the additive search: each former routine's result,
written out here as it was, is reproduced bit for bit on a random SPD problem with dead inputs."""
import pytest
import torch

from casp.algorithms.hessian import prepare_hessian, shrink_off_diagonal_, symmetrize_
from casp.quant.gptq import _prepare, inverse_hessian_cholesky

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spd_problem(n=48, out_f=12, seed=0, dead=(3, 17, 40)):
    """W and an SPD-but-for-dead-inputs H = XᵀX (float32, correlated, uneven scales, slightly asymmetric)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g) @ torch.randn(n, n, generator=g) / n ** 0.5
    x = x * torch.exp(0.5 * torch.randn(n, generator=g))
    x[:, list(dead)] = 0.0
    h = x.T @ x
    h = h + 1e-6 * torch.randn(n, n, generator=g) * h.abs().mean() * (h != 0)   # as accumulated: not exactly symmetric
    return torch.randn(out_f, n, generator=g), h


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits_of(a), bits_of(b))


def old_shrink_(h, shrink):
    if shrink:
        kept = h.diagonal().clone()
        h.mul_(1.0 - shrink).diagonal().copy_(kept)
    return h


def old_gptq_prepare(weight, xtx, act_order, damp, hessian_dtype, shrink):
    """casp.quant.gptq._prepare before prepare_hessian."""
    w = weight.detach().to(torch.float32).clone()
    src = xtx.detach().to(device=w.device, dtype=hessian_dtype)
    diag = src.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        h = src.index_select(0, perm).index_select(1, perm)
        dead = dead[perm]
    else:
        perm = None
        h = src.clone()
    if bool(dead.any()):
        h[dead, dead] = 1.0
    old_shrink_(h, shrink)
    u, _ = inverse_hessian_cholesky(h, damp)
    return w, perm, u.to(torch.float32)


def old_damp_hessian(h, damp, shrink=0.0):
    """casp.algorithms.ldlq.damp_hessian (BlockLDLQ / E8)."""
    h = h.detach().to(torch.float64)
    h = 0.5 * (h + h.T)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    old_shrink_(h, shrink)
    return h + damp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def old_additive_damped(h, damp):
    """casp.algorithms.additive.damped (AQLM)."""
    h = h.detach().to(torch.float64)
    h = 0.5 * (h + h.T)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    h = h + damp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h.float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("hessian_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shrink", [0.0, 0.3])
def test_gptq_prepare_as_before(act_order, hessian_dtype, shrink):
    w, h = spd_problem()
    before = h.clone()
    want = old_gptq_prepare(w, h, act_order, 0.01, hessian_dtype, shrink)
    got = _prepare(w, h, act_order, 0.01, hessian_dtype, shrink)
    assert_bitwise(got[0], want[0])
    assert (got[1] is None and want[1] is None) or torch.equal(got[1], want[1])
    assert_bitwise(got[2], want[2])
    assert_bitwise(h, before)


@pytest.mark.parametrize("damp,shrink", [(0.01, 0.0), (0.1, 0.5), (0.0, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_ldlq_hessian_as_before(damp, shrink, dtype):
    _, h = spd_problem(seed=1)
    h = h.to(dtype)
    before = h.clone()
    assert_bitwise(prepare_hessian(h, damp, shrink), old_damp_hessian(h, damp, shrink))
    assert_bitwise(h, before)


@pytest.mark.parametrize("damp", [0.01, 0.0, 0.2])
def test_additive_hessian_as_before(damp):
    _, h = spd_problem(seed=2)
    h = h.double()
    before = h.clone()
    assert_bitwise(prepare_hessian(h, damp).float(), old_additive_damped(h, damp))
    assert_bitwise(h, before)


def test_steps():
    h = torch.tensor([[4.0, 1.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    got = prepare_hessian(h, 0.5, shrink=0.5)
    sym = torch.tensor([[4.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(got, shrink_off_diagonal_(sym.clone(), 0.5) + 0.5 * (7 / 3) * torch.eye(3, dtype=torch.float64))
    kept = prepare_hessian(h, None, dtype=torch.float32, symmetrize=False, order=torch.tensor([2, 0, 1]))
    assert torch.equal(kept, torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 1.0], [0.0, 3.0, 2.0]]))


@pytest.mark.parametrize("n,piece", [(9, 4), (40, 40), (33, 256)])
def test_symmetrizing_in_place_by_pieces_is_the_copying_formula(n, piece):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, n, dtype=torch.float64, generator=g)
    kept = h.clone()
    out = symmetrize_(h, piece)
    assert out is h and torch.equal(h, 0.5 * (kept + kept.T))


def test_a_float32_hessian_is_prepared_without_touching_the_callers_copy():
    """From float32 the float64 copy is the function's own, symmetrised in place; the caller's H is kept."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(24, 24, generator=g)
    kept = h.clone()
    out = prepare_hessian(h, 0.01)
    assert torch.equal(h, kept) and out.dtype == torch.float64
    h64 = kept.double()
    expected = 0.5 * (h64 + h64.T)
    expected = expected + 0.01 * float(expected.diagonal().mean()) * torch.eye(24, dtype=torch.float64)
    assert torch.equal(out, expected)
