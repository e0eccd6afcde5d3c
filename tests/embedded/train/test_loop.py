"""The stage-2 learning-rate schedule: warm-up, cosine to 5%, by steps or by time budget."""

from types import SimpleNamespace

import pytest

from casp.embedded.train.loop import lr_at


def test_lr_schedule():
    args = SimpleNamespace(lr=1e-3, warmup=10, steps=110)
    assert lr_at(0, args) == pytest.approx(1e-4) and lr_at(9, args) == pytest.approx(1e-3)
    assert lr_at(10, args) == pytest.approx(1e-3)
    assert lr_at(60, args) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert lr_at(110, args) == pytest.approx(5e-5)
    assert lr_at(10, args, elapsed=50, budget_s=100) == pytest.approx(lr_at(60, args))  # time runs out first
    assert lr_at(10, args, elapsed=500, budget_s=100) == pytest.approx(5e-5)
