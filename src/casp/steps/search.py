"""Step (--search-steps N): correct the allocator's estimate with measured KL, EvoPress-style.

The estimate (a sum of per-matrix damages) does not predict end-to-end damage exactly: layer errors
do not add up. So the allocator's answer is only a start. Every candidate setting of every matrix was
already quantized while its damage was measured (on the original inputs); those weights form a
database, and a candidate allocation is evaluated by putting its weights into the model and
measuring KL(FP ‖ model) on calibration data held apart from the data used for quantization.

Search: (1+1) elitist. A mutation moves one allocator unit one rung up its cost ladder and then moves
random other units one rung down until the exact budget holds again (EvoPress's level switch); the
child replaces the parent when its KL is lower. Deterministic under the seed.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from casp.data.scored import model_inputs
from casp.models.offload import offloaded
from casp.models.placement import to_device
from casp.steps.allocation import Allocation
from casp.steps.units import UnitKey


class WeightSwapper:
    """Puts database weights into the model's decoder linears, and restores the originals."""

    def __init__(self, layers, database: dict[tuple[UnitKey, str], torch.Tensor]):
        self.layers = layers
        self.database = database
        self.original: dict[UnitKey, torch.Tensor] = {}

    def _module(self, key: UnitKey):
        return self.layers[key.layer].get_submodule(key.name)

    def apply(self, allocation: Allocation, choice: dict[str, str]) -> None:
        self.put((key, label) for name, label in choice.items() for key in allocation.members[name])

    def put(self, pairs) -> None:
        """The database weight of each (unit key, label) into its module."""
        for key, label in pairs:
            module = self._module(key)
            if key not in self.original:
                self.original[key] = module.weight.data
            module.weight.data = self.database[(key, label)].to(self.original[key].dtype)

    def restore(self) -> None:
        for key, w in self.original.items():
            self._module(key).weight.data = w
        self.original.clear()


# Tokens whose log-softmax is taken at once: a 262k vocabulary makes a whole batch of float32 log-probs gigabytes.
KL_CHUNK = 128


def held_rows(batches):
    """Text batches one row at a time (the logits of a whole batch over a large vocabulary are gigabytes)."""
    for b in batches:
        if set(b) <= {"input_ids", "attention_mask"}:
            yield from ({k: v[i:i + 1] for k, v in b.items()} for i in range(len(b["input_ids"])))
        else:
            yield b


def fp_reference(run, held: list[dict]) -> list[torch.Tensor]:
    """The original model's log-probabilities on `held`, taken once per run and shared by the steps that
    measure KL on the same samples (layer scales, the search, the baseline check). Call it only while the model is
    still the original."""
    cached = run.reference
    if cached is not None and len(cached[0]) == len(held) and all(a is b for a, b in zip(cached[0], held)):
        return cached[1]
    with offloaded(run.model, run.adapter, run.device):
        reference = reference_logprobs(run.model, held, run.device)
    run.reference = (list(held), reference)
    return reference


@torch.no_grad()
def reference_logprobs(model, batches, device="cpu") -> list[torch.Tensor]:
    """FP next-token log-probabilities on the held-out batches, one text row at a time (fp16; on the CPU)."""
    out = []
    for b in held_rows(batches):
        logits = model(**to_device(model_inputs(b), device), use_cache=False).logits
        out.append(torch.cat([F.log_softmax(c.float(), -1).half().cpu() for c in logits.split(KL_CHUNK, dim=1)], 1))
        del logits
    return out


def kl_to_reference(model, batches, reference: list[torch.Tensor], device="cpu") -> float:
    """Mean over real tokens of KL(FP ‖ model), computed on `device`, `KL_CHUNK` tokens at a time."""
    rows = kl_rows(model, batches, reference, device)
    return sum(t for t, _ in rows) / max(sum(c for _, c in rows), 1)


@torch.no_grad()
def kl_rows(model, batches, reference: list[torch.Tensor], device="cpu") -> list[tuple[float, int]]:
    """(summed KL(FP ‖ model), real tokens) of each held-out row, in the order of `reference`."""
    out = []
    for b, ref in zip(held_rows(batches), reference):
        b = to_device(b, device)
        logits = model(**model_inputs(b), use_cache=False).logits
        out.append(row_kl(logits, ref, b.get("attention_mask")))
        del logits
    return out


def row_kl(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """(summed KL(FP ‖ model), real tokens) of one row's logits against its reference log-probabilities."""
    total, count = 0.0, 0
    for logq, p, m in kl_chunks(logits, ref, mask):
        kl = (p.exp() * (p - logq)).sum(-1)
        total += float(kl[m].sum())
        count += int(m.sum())
    return total, count


def kl_chunks(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None):
    """One row `KL_CHUNK` tokens at a time: (the model's float32 log-probabilities, the reference's as float32, the
    real-token mask), all on the logits' device."""
    mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    for q, p, m in zip(logits.split(KL_CHUNK, 1), ref.split(KL_CHUNK, 1), mask.split(KL_CHUNK, 1)):
        yield F.log_softmax(q.float(), -1), p.to(q.device).float(), m.to(q.device)


def _ladders(allocation: Allocation) -> dict[str, list[str]]:
    """Each unit's labels by increasing cost, one label per distinct cost (the cheaper on ties of distortion)."""
    out = {}
    for u in allocation.units:
        labels = sorted(u.cost_bits, key=lambda k: (u.cost_bits[k], u.distortion.get(k, 0.0), k))
        ladder = []
        for k in labels:
            if not ladder or u.cost_bits[k] > u.cost_bits[ladder[-1]]:
                ladder.append(k)
        out[u.name] = ladder
    return out


def mutate(allocation: Allocation, choice: dict[str, str], ladders, rng: random.Random) -> dict[str, str] | None:
    """One unit up a rung, random others down a rung until the budget holds; None if that fails."""
    cost = {u.name: u.cost_bits for u in allocation.units}
    child = dict(choice)

    def rung(n):   # a label off the ladder (a start's) sits on the rung of its cost
        return next(i for i, k in enumerate(ladders[n]) if cost[n][k] == cost[n][child[n]])

    up = [n for n in child if rung(n) + 1 < len(ladders[n])]
    if not up:
        return None
    a = rng.choice(up)
    child[a] = ladders[a][rung(a) + 1]
    total = sum(cost[n][child[n]] for n in child)
    others = [n for n in child if n != a]
    rng.shuffle(others)
    for n in others:
        if total <= allocation.budget_bits:
            break
        i = rung(n)
        if i > 0:
            total += cost[n][ladders[n][i - 1]] - cost[n][child[n]]
            child[n] = ladders[n][i - 1]
    return child if total <= allocation.budget_bits else None


def search(run, allocation: Allocation, database, batches, starts: dict[str, dict[str, str]] | None = None) -> dict:
    """Refine `allocation.choice` in place; returns a summary (KL of the start and of the result).

    `starts` are other named answers (allocation alone, uniform): the search begins from whichever of
    them and the estimate's optimum has the lowest held-out KL, so its result is never worse than any
    of them on that KL.

    Every forward runs with the model on the CPU and each decoder layer on the run's device in turn; the
    recipe gives the number of steps and the seed.
    """
    model, adapter, device = run.model, run.adapter, run.device
    steps, seed = run.recipe.search_steps, run.seed
    reference = fp_reference(run, batches)
    swapper = WeightSwapper(adapter.decoder_layers(model), database)
    ladders = _ladders(allocation)

    def fitness(choice):
        swapper.apply(allocation, choice)
        try:
            with offloaded(model, adapter, device):
                return kl_to_reference(model, batches, reference, device)
        finally:
            swapper.restore()

    cost = {u.name: u.cost_bits for u in allocation.units}
    best = dict(allocation.choice)
    best_kl = start_kl = fitness(best)
    start_kls, started_from = {"estimate": start_kl}, "estimate"
    for name, start in (starts or {}).items():
        if any(start[n] not in cost[n] for n in start):
            continue
        if sum(cost[n][start[n]] for n in start) <= allocation.budget_bits:
            kl = start_kls[name] = fitness(start)
            if kl < best_kl:
                best, best_kl, started_from = dict(start), kl, name
    rng = random.Random(seed)
    accepted = 0
    for _ in tqdm(range(steps), desc="search", disable=not run.progress):
        child = mutate(allocation, best, ladders, rng)
        if child is None:
            continue
        kl = fitness(child)
        if kl < best_kl:
            best, best_kl, accepted = child, kl, accepted + 1
    allocation.choice = best
    return {"steps": steps, "accepted": accepted, "kl_start": start_kl, "kl_result": best_kl,
            "kl_of_starts": start_kls, "started_from": started_from,
            "held_out_tokens": sum(int(b["input_ids"].numel()) for b in batches)}
