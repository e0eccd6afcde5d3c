"""The Fisher-weighted output distortion, checked against errors computed on explicit tokens."""
import torch

from casp.algorithms.distortion import weighted_distortion
from casp.quant.base import quant_loss


def _data(m=6, n=9, r=4, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64)
    return x, torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64), \
        torch.rand(m, generator=g, dtype=torch.float64) + 0.1


def test_unweighted_is_the_gptq_loss():
    x, _, delta, _ = _data()
    h = x.T @ x
    assert abs(weighted_distortion(delta, h) - quant_loss(delta, torch.zeros_like(delta), h)) < 1e-9


def test_fisher_weights_each_output_channel():
    x, a, _, f = _data()
    delta = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = float(((x @ delta.T) ** 2 * f).sum())
    assert abs(weighted_distortion(delta, x.T @ x, f) - want) < 1e-8 * want


def test_lift_prices_a_down_factor_error_at_the_projection_output():
    """y = A(Bx): an error ΔB of the down factor reaches the loss as A ΔB x, weighted by F of y."""
    x, a, delta_b, f = _data()
    want = float(((x @ delta_b.T @ a.T) ** 2 * f).sum())
    got = weighted_distortion(delta_b, x.T @ x, f, lift=a)
    assert abs(got - want) < 1e-8 * want
    assert abs(weighted_distortion(a @ delta_b, x.T @ x, f) - want) < 1e-8 * want


def test_float32_inputs_are_summed_in_float64():
    x, a, delta_b, f = _data()
    got = weighted_distortion(delta_b.float(), (x.T @ x).float(), f.float(), lift=a.float())
    want = weighted_distortion(delta_b, x.T @ x, f, lift=a)
    assert abs(got - want) < 1e-4 * want
