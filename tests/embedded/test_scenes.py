"""Scene generator: determinism, disjoint splits, record format, closed vocabulary."""

import numpy as np
import pytest

from casp.embedded.scenes import (
    IMAGE_SIZE,
    QUESTION_TYPES,
    generate_caption_records,
    generate_records,
    iter_scenes,
    make_scene,
    split_of,
    vocabulary,
    _signature,
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
