"""Scene generator: determinism, disjoint splits, record format, closed vocabulary, structured referents."""

import numpy as np
import pytest

from casp.embedded.scenes import (
    IMAGE_SIZE,
    PLURALS,
    QUESTION_TYPES,
    RELATIONS,
    generate_caption_records,
    generate_records,
    iter_scenes,
    make_scene,
    split_of,
    vocabulary,
    _signature,
    draw_questions,
    questions_for,
    swap_relation,
)


def test_same_seed_same_pixels_and_questions():
    a, b = make_scene("train", 123), make_scene("train", 123)
    assert np.array_equal(a.pixels, b.pixels)
    assert a.qa == b.qa and a.caption == b.caption
    ra, rb = generate_records("test", 5), generate_records("test", 5)
    assert [(r["question"], r["answer"], r["type"]) for r in ra] == [(r["question"], r["answer"], r["type"]) for r in rb]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(ra, rb))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_scenes_belong_to_their_split(split):
    assert all(split_of(s.objects) == split for s in iter_scenes(split, 100))


def test_splits_are_disjoint():
    sigs = {split: {_signature(s.objects) for s in iter_scenes(split, 300)} for split in ("train", "validation", "test")}
    assert not sigs["train"] & sigs["test"]
    assert not sigs["train"] & sigs["validation"]
    assert not sigs["validation"] & sigs["test"]


def test_records_format_and_types():
    records = generate_records("validation", 40)
    assert {r["type"] for r in records} == set(QUESTION_TYPES)
    r = records[0]
    assert set(r) == {"image", "question", "answer", "type"}
    assert r["image"].size == (IMAGE_SIZE, IMAGE_SIZE) and r["image"].mode == "RGB"
    assert {x["answer"] for x in records if x["type"] in ("exists", "relation")} == {"yes", "no"}
    caps = generate_caption_records("validation", 3)
    assert all(c["type"] == "caption" and c["answer"].endswith(".") for c in caps)


def test_vocabulary_is_closed():
    vocab = set(vocabulary())
    for s in iter_scenes("train", 200):
        for q, a, _ in s.qa:
            assert set(q.split()) | set(a.split()) <= vocab
        assert set(s.caption.split()) <= vocab


def test_unknown_split_rejected():
    with pytest.raises(ValueError):
        make_scene("dev", 0)


def _train_questions(n_scenes=60):
    """(scene, question) over the first training scenes."""
    for i in range(n_scenes):
        scene = make_scene("train", i)
        for q in scene.questions:
            yield scene, q


def test_qa_triples_are_the_questions():
    for i in range(20):
        scene = make_scene("train", i)
        assert scene.qa == [(q.text, q.answer, q.type) for q in scene.questions]
        a = questions_for(scene.objects, np.random.default_rng([i, 1]))
        b = draw_questions(scene.objects, np.random.default_rng([i, 1]))
        assert a == [q.triple for q in b]


def test_referent_is_the_object_a_question_names():
    checked = 0
    for scene, q in _train_questions():
        o = q.referent
        if q.type == "color":
            assert o is not None and o.color == q.answer
        elif q.type == "position":
            assert o is not None and o.quadrant == q.answer
        elif q.type == "exists":
            assert (o is not None) == (q.answer == "yes")
        elif q.type == "relation":  # the first object named
            assert o is not None and q.text.startswith(f"is the {o.color} {o.shape} ")
        else:
            assert o is None
        checked += 1
    assert checked > 200


def test_second_referent_of_relation_questions():
    n = 0
    for scene, q in _train_questions():
        o = q.second
        if q.type != "relation":
            assert o is None and q.relation is None
            continue
        assert o is not None and q.text.endswith(f"the {o.color} {o.shape} ?")
        first = q.referent
        truth = {"left of": first.col < o.col, "right of": first.col > o.col,
                 "above": first.row < o.row, "below": first.row > o.row}[q.relation]
        assert truth == (q.answer == "yes")
        n += 1
    assert n > 50


def _answer_from_structure(scene, q):
    """The answer recomputed from the question's referents alone (no text)."""
    objects = scene.objects
    if q.type == "color":
        return q.referent.color
    if q.type == "position":
        return q.referent.quadrant
    if q.type == "exists":
        return "no" if q.referent is None else "yes"
    if q.type == "count":
        return str(sum(1 for o in objects if q.counted in (o.shape, o.color)))
    a, b = q.referent, q.second
    return "yes" if {"left of": a.col < b.col, "right of": a.col > b.col,
                     "above": a.row < b.row, "below": a.row > b.row}[q.relation] else "no"


def test_structured_referents_agree_with_answers():
    """Over 40 scenes and two question draws each (and every relation swapped), the referents give the answer."""
    kinds = set()
    for i in range(40):
        scene = make_scene("train", i)
        for q in scene.questions + draw_questions(scene.objects, np.random.default_rng([i, 1])):
            for question in [q, swap_relation(q)] if q.type == "relation" else [q]:
                for o in (question.referent, question.second):
                    assert o is None or o in scene.objects
                assert _answer_from_structure(scene, question) == question.answer, question
                kinds.add(question.type)
            if q.type == "relation":
                s = swap_relation(q)
                assert (s.referent, s.second, s.answer) == (q.second, q.referent, q.answer)
                assert s.relation in RELATIONS
                assert s.text == f"is the {s.referent.name} {s.relation} the {s.second.name} ?"
            if q.type == "count":
                assert q.counted in q.text.split() or PLURALS.get(q.counted) in q.text.split()
    assert kinds == set(QUESTION_TYPES)
