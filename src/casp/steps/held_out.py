"""The held-out samples that probes measure KL(FP ‖ model) on, with the original's layer states kept.

A probe changes the weights of some decoder layers and measures the model's output distribution on the held-out
rows. When every change is at layer i or above, layers below i compute what the original did, so the run starts
at layer i from the original's kept inputs (`casp.models.suffix`): a layer probe runs on average half the stack.
The kept path is used only where it reproduces the original model's own log-probabilities (its head is the
model's: final norm, LM head, soft cap); elsewhere every probe runs the whole model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from casp.models.offload import offloaded
from casp.models.suffix import LayerStates, layer_states, logits_from
from casp.steps.search import fp_reference, held_rows, kl_chunks, kl_rows, row_kl

logger = logging.getLogger(__name__)

# The kept path must give the original's log-probabilities to this much (nats) wherever the reference gives a
# token more than e^-10: far above fp16's rounding of the reference there (< 0.004), far below any missing logit
# scale or cap.
AGREEMENT = 0.02


@dataclass
class HeldOut:
    """Held-out rows (one text row per batch), the original's log-probabilities on them, and its layer states
    (None: probes run the whole model)."""

    rows: list[dict]
    reference: list[torch.Tensor]
    states: LayerStates | None = None

    def kl_rows(self, run, first_layer: int) -> list[tuple[float, int]]:
        """(summed KL, tokens) per row of the model as it is now, every change being at `first_layer` or above."""
        if self.states is None or first_layer <= 0:
            with offloaded(run.model, run.adapter, run.device):
                return kl_rows(run.model, self.rows, self.reference, run.device)
        logits = logits_from(run.model, run.adapter, self.states, first_layer, run.device)
        return [row_kl(q, ref, b.get("attention_mask")) for q, b, ref in zip(logits, self.rows, self.reference)]


@torch.no_grad()
def held_out(run, held: list[dict]) -> HeldOut:
    """The rows of `held` with the original's reference, and its layer states where they reproduce it."""
    rows = list(held_rows(held))
    reference = fp_reference(run, held)
    states = layer_states(run.model, run.adapter, rows, run.device)
    last = len(states.hidden) - 1
    found = logits_from(run.model, run.adapter, states, last, run.device)
    gap = max(_gap(q, ref, b.get("attention_mask")) for q, b, ref in zip(found, rows, reference))
    if gap > AGREEMENT:
        logger.info("layer states do not reproduce the model's own output (%.3g nats); every probe runs the whole "
                    "model", gap)
        return HeldOut(rows, reference)
    return HeldOut(rows, reference, states)


def _gap(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Largest |log p - reference| over real tokens where the reference exceeds e^-10."""
    worst = 0.0
    for logq, p, m in kl_chunks(logits, ref, mask):
        seen = (p > -10) & m.unsqueeze(-1)
        if seen.any():
            worst = max(worst, float((logq - p)[seen].abs().max()))
    return worst
