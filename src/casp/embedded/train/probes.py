"""Auxiliary heads of the embedded model's training, and their targets (all discarded after training).

From-scratch training of the tiny LLaVA sits on a long plateau: answering needs the question
gathered at the answer position *and* a lookup of the matching visual tokens, and neither step
gets a gradient until the other works. Each probe supervises one step directly:

- ``PatchProbe``: what lies under every visual token (colour, shape, size, row, column);
  on the vision tower in stage 1, on the projector output in stage 2.
- ``QuestionProbe``: the question read back word by word from the answer position.
- ``ReferentProbe``: the attributes and cell of the object the question names (and the cell of
  a relation's second object), plus the number of objects of every shape and colour.

The targets come from the scenes' structured data (``SceneObject``, ``Question``), never from text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casp.embedded.scenes import COLORS, COUNT_WORDS, GRID, SHAPES, SIZES, Question

QUESTION_SLOTS = 12  # longest question, in words
REFERENT_FIELDS = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES),
                   "row": list(range(GRID)), "col": list(range(GRID))}
SECOND_FIELDS = ("row", "col")  # of the second object of a relation question
COUNT_KEYS = list(SHAPES) + list(COLORS)
PATCHES = 8  # patches per side (64 / 8)
PER_CELL = PATCHES // GRID  # patches per grid cell side


def referent_targets(question: Question) -> list[int]:
    """Class ids of REFERENT_FIELDS for the named object, then SECOND_FIELDS for the second one (-100: none)."""
    out = []
    for o, fields in ((question.referent, REFERENT_FIELDS), (question.second, SECOND_FIELDS)):
        out += [-100] * len(fields) if o is None else [REFERENT_FIELDS[k].index(getattr(o, k)) for k in fields]
    return out


def scene_counts(objects) -> list[int]:
    """How many objects have each shape, then each colour (the COUNT_KEYS order)."""
    return [sum(1 for o in objects if key in (o.shape, o.color)) for key in COUNT_KEYS]


def patch_targets(scene) -> dict[str, torch.Tensor]:
    """Per-patch labels (0 = background): each object's grid cell covers PER_CELL x PER_CELL patches."""
    grid = {k: torch.zeros(PATCHES, PATCHES, dtype=torch.long) for k in ("color", "shape", "size")}
    for o in scene.objects:
        sl = (slice(PER_CELL * o.row, PER_CELL * (o.row + 1)), slice(PER_CELL * o.col, PER_CELL * (o.col + 1)))
        grid["color"][sl] = 1 + list(COLORS).index(o.color)
        grid["shape"][sl] = 1 + SHAPES.index(o.shape)
        grid["size"][sl] = 1 + list(SIZES).index(o.size)
    out = {k: v.flatten() for k, v in grid.items()}
    idx = torch.arange(PATCHES * PATCHES)
    out["row"], out["col"] = idx // PATCHES, idx % PATCHES
    return out


def stack_patch_targets(scenes) -> dict[str, torch.Tensor]:
    """patch_targets of each scene, stacked into (batch, patches) tensors per label."""
    aux = [patch_targets(s) for s in scenes]
    return {k: torch.stack([a[k] for a in aux]) for k in aux[0]}


class PatchProbe(torch.nn.Module):
    """Linear heads labelling every visual token with what lies under it, and where it is.

    Gives the vision tower a direct signal from step one, instead of waiting for the language
    model to learn to attend to the right patches.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({
            "color": torch.nn.Linear(dim, len(COLORS) + 1),
            "shape": torch.nn.Linear(dim, len(SHAPES) + 1),
            "size": torch.nn.Linear(dim, len(SIZES) + 1),
            "row": torch.nn.Linear(dim, PATCHES),
            "col": torch.nn.Linear(dim, PATCHES),
        })

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(h(feats).flatten(0, 1), targets[k].flatten()) for k, h in self.heads.items())


def _answer_states(hidden: torch.Tensor, pos: torch.Tensor):
    """Hidden states at every turn's last prompt token: (states [N, D], batch index [N], turn index [N])."""
    b_idx, t_idx = (pos >= 0).nonzero(as_tuple=True)
    return hidden[b_idx, pos[b_idx, t_idx]], b_idx, t_idx


class QuestionProbe(torch.nn.Module):
    """Heads reading the whole question back from the last prompt token (the first step of answering)."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.head = torch.nn.Linear(dim, QUESTION_SLOTS * vocab)

    def loss(self, hidden: torch.Tensor, pos: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D); pos (B, T) positions (-1 = none); words (B, T, SLOTS) ids (-100 = none)."""
        h, b_idx, t_idx = _answer_states(hidden, pos)
        logits = self.head(h).view(-1, QUESTION_SLOTS, self.vocab)
        return F.cross_entropy(logits.flatten(0, 1), words[b_idx, t_idx].flatten(), ignore_index=-100)


class ReferentProbe(torch.nn.Module):
    """Heads naming the queried object's attributes from the answer position (the second step of answering).

    A second set of heads gives the number of objects of every shape and every colour, from every
    answer position: the scene statistics that counting questions select from.
    """

    def __init__(self, dim: int, second: bool = False):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in REFERENT_FIELDS.items()})
        self.counts = torch.nn.Linear(dim, len(COUNT_KEYS) * len(COUNT_WORDS))
        if second:
            for k in SECOND_FIELDS:
                self.heads[f"second_{k}"] = torch.nn.Linear(dim, len(REFERENT_FIELDS[k]))

    def loss(self, hidden: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """targets (B, T, fields) class ids, -100 where a turn has no referent; counts (B, len(COUNT_KEYS))."""
        h, b_idx, t_idx = _answer_states(hidden, pos)
        tgt = targets[b_idx, t_idx]
        total = sum(F.cross_entropy(head(h), tgt[:, j], ignore_index=-100) for j, head in enumerate(self.heads.values()))
        count_logits = self.counts(h).view(-1, len(COUNT_KEYS), len(COUNT_WORDS))
        return total + F.cross_entropy(count_logits.flatten(0, 1), counts[b_idx].flatten())
