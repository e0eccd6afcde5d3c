"""--search-steps: KL-guided search over the allocation, within the exact budget, deterministic."""
import random

import pytest
import torch

import casp
from casp.algorithms import allocate as alloc
from casp.config import CompressionConfig
from casp.recipe import resolve
from casp.steps.allocation import Allocation
from casp.steps.search import _ladders, mutate


def _allocation(n=12, seed=0):
    rng = random.Random(seed)
    units = []
    for i in range(n):
        w = rng.choice([64, 128, 256])
        units.append(alloc.Unit(f"u{i}", w, {"a": 2 * w, "b": 3 * w + rng.randint(0, 9), "c": 4 * w},
                                {"a": 3.0, "b": 2.0, "c": 1.0}))
    return Allocation(units, {u.name: [u.name] for u in units}, {u.name: "b" for u in units},
                      sum(u.cost_bits["b"] for u in units) + 5)


@pytest.mark.parametrize("seed", range(5))
def test_mutation_keeps_the_exact_budget_and_moves_something(seed):
    a = _allocation(seed=seed)
    ladders, rng, choice = _ladders(a), random.Random(seed), dict(a.choice)
    cost = {u.name: u.cost_bits for u in a.units}
    for _ in range(50):
        child = mutate(a, choice, ladders, rng)
        if child is None:
            continue
        assert sum(cost[n][child[n]] for n in child) <= a.budget_bits
        assert child != choice
        choice = child


def test_mutation_starts_from_a_label_off_the_ladder():
    """A start (allocation alone, uniform) may pick a label that ties another on cost; the ladder keeps
    one label per cost, and mutation moves from the rung of that cost."""
    a = _allocation(seed=0)
    for u in a.units:
        u.cost_bits["b2"] = u.cost_bits["b"]
        u.distortion["b2"] = u.distortion["b"] + 1.0
    ladders = _ladders(a)
    assert all("b2" not in ladder for ladder in ladders.values())
    cost = {u.name: u.cost_bits for u in a.units}
    start = {u.name: "b2" for u in a.units}
    child = mutate(a, start, ladders, random.Random(0))
    assert child is not None and child != start
    assert sum(cost[n][child[n]] for n in child) <= a.budget_bits


def _cfg(scene_text, **kw):
    base = dict(bits=2.6, quantizer="gptq", qk_rank="joint", search_steps=6, search_samples=2, calib_samples=8,
                calib_seq_len=32, calib_text=str(scene_text))
    base.update(kw)
    return CompressionConfig(**base)


def test_search_improves_or_keeps_held_out_kl_and_is_deterministic(tiny_llama_dir, scene_text):
    a = casp.compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    b = casp.compress(tiny_llama_dir, None, _cfg(scene_text), progress=False)
    s = a.report["search"]
    assert s["kl_result"] <= s["kl_start"] and s["held_out_tokens"] == 2 * 32
    # it starts from the best of the estimate, allocation alone and uniform, so it beats each on held-out KL
    assert set(s["kl_of_starts"]) == {"estimate", "allocation alone", "uniform"} or \
        set(s["kl_of_starts"]) == {"estimate", "joint", "uniform"}
    assert s["kl_result"] <= min(s["kl_of_starts"].values())
    assert s["kl_of_starts"][s["started_from"]] == min(s["kl_of_starts"].values())
    assert a.report["average_bits"] <= 2.6
    assert [r["setting"] for r in a.report["layers"]] == [r["setting"] for r in b.report["layers"]]
    ids = torch.randint(5, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_search_needs_whole_matrices():
    with pytest.raises(casp.CaspError, match="search"):
        resolve(CompressionConfig(qk_rank=0.25, search_steps=4), None)
