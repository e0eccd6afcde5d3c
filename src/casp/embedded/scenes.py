"""Synthetic 64x64 shape scenes with VQA questions and captions.

The embedded reference model is trained and evaluated on these scenes. Everything
is deterministic: scene ``i`` of a split is drawn from ``numpy.random.default_rng
([SPLIT_SEEDS[split], i])``.

Splits are disjoint by content, not only by seed: every scene has a canonical
signature (its sorted object list) and a hash of that signature decides which
split may hold it (test: hash % 10 == 0, validation: == 1, train: the rest).
A draw whose signature belongs to another split is rejected and redrawn, so
no test scene ever appears in training, even the small one-object scenes.

Layout: the image is a 2x2 grid of 32-pixel cells (four 8-pixel patches a side);
each object occupies its own cell (small: 16 px, large: 28 px), so objects never
overlap. Positions are answered by quadrant ("top left", ...); ``left of`` /
``above`` compare grid columns / rows and are only asked when they differ.
Objects cover a quarter of the image each: with smaller objects (a 4x4 grid was
tried) a from-scratch model cannot find them within a CPU training budget.

Every question is a ``Question``: its text, answer and type plus what it refers to
(the object(s) it names, a relation's operator, the shape or colour a count counts),
so consumers such as the trainer's auxiliary targets read the structure instead of
parsing the text back. ``Scene.qa`` and ``questions_for`` keep the plain
``(question, answer, type)`` triples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
GRID = 2
CELL = IMAGE_SIZE // GRID

SHAPES = ("square", "circle", "triangle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SIZES = {"small": 16, "large": 28}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("0", "1", "2", "3", "4")
QUESTION_TYPES = ("color", "count", "exists", "position", "relation")
CAPTION_PROMPT = "describe the image ."
BACKGROUND = (20, 20, 20)

# Split-specific base seeds; scene i of a split uses default_rng([seed, i]).
SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}
# A scene belongs to the split whose residue its signature hash has (mod 10).
_SPLIT_RESIDUES = {"test": {0}, "validation": {1}, "train": set(range(2, 10))}


@dataclass(frozen=True)
class SceneObject:
    """One object: shape, colour name, size name and grid cell (row, col)."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def quadrant(self) -> str:
        vertical = "top" if self.row < GRID // 2 else "bottom"
        horizontal = "left" if self.col < GRID // 2 else "right"
        return f"{vertical} {horizontal}"


def _signature(objects: list[SceneObject]) -> str:
    return ";".join(sorted(f"{o.shape},{o.color},{o.size},{o.row},{o.col}" for o in objects))


def split_of(objects: list[SceneObject]) -> str:
    """Which split a scene's content belongs to (by a hash of its signature)."""
    digest = hashlib.sha256(_signature(objects).encode()).digest()
    residue = int.from_bytes(digest[:4], "little") % 10
    return next(s for s, r in _SPLIT_RESIDUES.items() if residue in r)


def _draw_objects(rng: np.random.Generator, max_objects: int = 4) -> list[SceneObject]:
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        # (colour, shape) is unique within a scene so "the red circle" is well defined.
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            if (color, shape) not in used:
                break
        used.add((color, shape))
        size = "small" if rng.random() < 0.5 else "large"
        objects.append(SceneObject(shape, color, size, int(cell) // GRID, int(cell) % GRID))
    objects.sort(key=lambda o: (o.row, o.col))
    return objects


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of a shape inscribed in a side x side box."""
    c = (side - 1) / 2.0
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (side / 2.0) ** 2
    if shape == "triangle":  # apex up: half-width grows linearly with the row
        half = (y + 1) / side * (side / 2.0)
        return np.abs(x - c) <= half
    if shape == "cross":
        arm = max(1, side // 6)
        return (np.abs(x - c) <= arm) | (np.abs(y - c) <= arm)
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[SceneObject]) -> np.ndarray:
    """Render objects to a uint8 HxWx3 array."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        side = SIZES[o.size]
        top = o.row * CELL + (CELL - side) // 2
        left = o.col * CELL + (CELL - side) // 2
        mask = _shape_mask(o.shape, side)
        img[top : top + side, left : left + side][mask] = COLORS[o.color]
    return img


def _ref(o: SceneObject) -> str:
    return f"{o.color} {o.shape}"


@dataclass(frozen=True)
class Question:
    """One generated question, its answer and type, and what it refers to.

    ``referent`` is the object the question names (a relation's first object); it is None
    for counts and for an ``is there`` answered no (the named object is absent). ``second``
    is a relation's second object and ``relation`` its entry of RELATIONS; ``counted`` is
    the shape or colour a count question counts.
    """

    text: str
    answer: str
    type: str
    referent: SceneObject | None = None
    second: SceneObject | None = None
    relation: str | None = None
    counted: str | None = None

    @property
    def triple(self) -> tuple[str, str, str]:
        """The plain ``(question, answer, type)`` form."""
        return self.text, self.answer, self.type


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _relation_question(a: SceneObject, rel: str, b: SceneObject, answer: str) -> Question:
    return Question(f"is the {_ref(a)} {rel} the {_ref(b)} ?", answer, "relation", a, b, rel)


def swap_relation(q: Question) -> Question:
    """The same relation asked with swapped operands (``A left of B`` -> ``B right of A``), same answer."""
    if q.type != "relation":
        raise ValueError(f"not a relation question: {q.text!r}")
    return _relation_question(q.second, _INVERSE[q.relation], q.referent, q.answer)


def draw_questions(objects: list[SceneObject], rng: np.random.Generator) -> list[Question]:
    """Questions for a scene: one or two of every applicable type."""
    qa: list[Question] = []
    shapes_present = [o.shape for o in objects]

    # color: refer by shape if unique, else by size + shape if unique
    o = objects[int(rng.integers(len(objects)))]
    if shapes_present.count(o.shape) == 1:
        qa.append(Question(f"what color is the {o.shape} ?", o.color, "color", o))
    elif sum(1 for p in objects if (p.shape, p.size) == (o.shape, o.size)) == 1:
        qa.append(Question(f"what color is the {o.size} {o.shape} ?", o.color, "color", o))

    # count: shapes or colours; mostly present ones, sometimes absent (answer 0)
    anchor = objects[int(rng.integers(len(objects)))]
    absent = rng.random() < 0.2
    if rng.random() < 0.6:
        shape = SHAPES[int(rng.integers(len(SHAPES)))] if absent else anchor.shape
        qa.append(Question(f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[shapes_present.count(shape)],
                           "count", counted=shape))
    else:
        color = list(COLORS)[int(rng.integers(len(COLORS)))] if absent else anchor.color
        n = sum(1 for p in objects if p.color == color)
        qa.append(Question(f"how many {color} objects are there ?", COUNT_WORDS[n], "count", counted=color))

    # exists: balanced yes / no; "no" often differs from a present object in one attribute
    if rng.random() < 0.5:
        o = objects[int(rng.integers(len(objects)))]
        qa.append(Question(f"is there a {_ref(o)} ?", "yes", "exists", o))
    else:
        present = {(p.color, p.shape) for p in objects}
        while True:
            if rng.random() < 0.6:
                base = objects[int(rng.integers(len(objects)))]
                if rng.random() < 0.5:
                    cand = (list(COLORS)[int(rng.integers(len(COLORS)))], base.shape)
                else:
                    cand = (base.color, SHAPES[int(rng.integers(len(SHAPES)))])
            else:
                cand = (list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if cand not in present:
                break
        qa.append(Question(f"is there a {cand[0]} {cand[1]} ?", "no", "exists"))

    # position
    o = objects[int(rng.integers(len(objects)))]
    qa.append(Question(f"where is the {_ref(o)} ?", o.quadrant, "position", o))

    # relation: up to two, each over a pair that differs along the asked axis
    if len(objects) >= 2:
        for _ in range(2):
            for _attempt in range(8):
                i, j = rng.choice(len(objects), size=2, replace=False)
                a, b = objects[int(i)], objects[int(j)]
                rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
                if rel in ("left of", "right of") and a.col != b.col:
                    truth = a.col < b.col if rel == "left of" else a.col > b.col
                elif rel in ("above", "below") and a.row != b.row:
                    truth = a.row < b.row if rel == "above" else a.row > b.row
                else:
                    continue
                qa.append(_relation_question(a, rel, b, "yes" if truth else "no"))
                break
    return qa


def questions_for(objects: list[SceneObject], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, type) triples for a scene (``draw_questions`` without the referents)."""
    return [q.triple for q in draw_questions(objects, rng)]


def caption_for(objects: list[SceneObject]) -> str:
    """Caption listing objects in raster order, e.g. 'a small red circle at top left .'"""
    parts = [f"a {o.size} {o.color} {o.shape} at {o.quadrant}" for o in objects]
    return " , ".join(parts) + " ."


@dataclass
class Scene:
    """A rendered scene with its questions and caption."""

    objects: list[SceneObject]
    pixels: np.ndarray
    questions: list[Question]
    caption: str

    @property
    def qa(self) -> list[tuple[str, str, str]]:
        """The questions as ``(question, answer, type)`` triples."""
        return [q.triple for q in self.questions]

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="RGB")


def make_scene(split: str, index: int, max_objects: int = 4) -> Scene:
    """Scene ``index`` of ``split`` (deterministic); ``max_objects`` < 4 gives easier curriculum scenes."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    while True:
        objects = _draw_objects(rng, max_objects)
        if split_of(objects) == split:
            break
    return Scene(objects, render(objects), draw_questions(objects, rng), caption_for(objects))


def iter_scenes(split: str, n_scenes: int, start: int = 0):
    """Yield scenes ``start .. start + n_scenes - 1`` of a split."""
    for i in range(start, start + n_scenes):
        yield make_scene(split, i)


def generate_records(split: str, n_scenes: int) -> list[dict]:
    """VQA records ``{"image", "question", "answer", "type"}`` for the first n scenes of a split."""
    records = []
    for scene in iter_scenes(split, n_scenes):
        image = scene.image
        for q, a, t in scene.qa:
            records.append({"image": image, "question": q, "answer": a, "type": t})
    return records


def generate_caption_records(split: str, n_scenes: int) -> list[dict]:
    """Caption records ``{"image", "question": CAPTION_PROMPT, "answer": caption, "type": "caption"}``."""
    return [
        {"image": s.image, "question": CAPTION_PROMPT, "answer": s.caption, "type": "caption"}
        for s in iter_scenes(split, n_scenes)
    ]


def vocabulary() -> list[str]:
    """Every word the generator can emit in questions, answers and captions (sorted)."""
    words: set[str] = set()
    words.update(SHAPES, PLURALS.values(), COLORS, SIZES, COUNT_WORDS)
    for phrase in POSITIONS + RELATIONS + (CAPTION_PROMPT,):
        words.update(phrase.split())
    words.update(
        "what color is the how many objects are there is a where yes no , . ? at".split()
    )
    return sorted(words)


def write_jsonl(split: str, n: int, out_dir: str | Path, captions: bool = False) -> Path:
    """Write PNGs and ``{split}.jsonl`` of ``{"image", "question", "answer", "type"}`` for n scenes.

    Image paths in the JSONL are relative to ``out_dir`` (the format ``load_vqa_jsonl`` reads).
    With ``captions=True`` one caption record per scene is added.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with path.open("w") as f:
        for i, scene in enumerate(iter_scenes(split, n)):
            rel = f"images/{split}_{i:06d}.png"
            scene.image.save(out_dir / rel)
            rows = [(q, a, t) for q, a, t in scene.qa]
            if captions:
                rows.append((CAPTION_PROMPT, scene.caption, "caption"))
            for q, a, t in rows:
                f.write(json.dumps({"image": rel, "question": q, "answer": a, "type": t}) + "\n")
    logger.info("wrote %s (%d scenes)", path, n)
    return path
