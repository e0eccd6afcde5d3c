"""Auxiliary targets: the referent heads' classes and the scene counts come from the scenes' structure."""

from casp.embedded.scenes import make_scene, swap_relation
from casp.embedded.train.probes import COUNT_KEYS, REFERENT_FIELDS, SECOND_FIELDS, referent_targets, scene_counts


def _train_questions(n_scenes=60):
    for i in range(n_scenes):
        scene = make_scene("train", i)
        for q in scene.questions:
            yield scene, q


def test_referent_targets_are_the_named_objects_attributes():
    n_second = 0
    for _, q in _train_questions():
        for question in [q, swap_relation(q)] if q.type == "relation" else [q]:
            tgt = referent_targets(question)
            assert len(tgt) == len(REFERENT_FIELDS) + len(SECOND_FIELDS)
            first, second = tgt[: len(REFERENT_FIELDS)], tgt[len(REFERENT_FIELDS):]
            o = question.referent
            assert first == ([-100] * len(first) if o is None else
                             [REFERENT_FIELDS[k].index(getattr(o, k)) for k in REFERENT_FIELDS])
            if question.type == "relation":
                assert second == [question.second.row, question.second.col]
                n_second += 1
            else:
                assert second == [-100, -100]
    assert n_second > 50


def test_scene_counts_answer_every_count_question():
    n = 0
    for scene, q in _train_questions():
        if q.type == "count":
            counts = dict(zip(COUNT_KEYS, scene_counts(scene.objects)))
            assert counts[q.counted] == int(q.answer), q
            n += 1
    assert n == 60
