"""Training batches: the chat template's token layout, answer positions, question draws."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from casp.embedded.build import NUM_VISUAL_TOKENS, build_processor
from casp.embedded.scenes import make_scene
from casp.embedded.train.data import ConversationEncoder, make_batch, pixel_values
from casp.eval.vqa import build_prompt


@pytest.fixture(scope="module")
def proc():
    return build_processor()


def test_encoding_matches_processor(proc):
    """The training token layout equals what the processor produces for the first turn."""
    scene = make_scene("train", 0)
    q, a, _ = scene.qa[0]
    enc = ConversationEncoder(proc).encode([(q, a)])
    ref = proc(text=[build_prompt(proc, q) + " " + a + "</s>"], images=[scene.image])
    assert enc.ids == ref["input_ids"][0]
    n_answer = len(a.split()) + 1
    assert [x for x in enc.labels if x != -100] == enc.ids[-n_answer:]
    assert torch.equal(pixel_values(proc, [scene]), torch.from_numpy(np.stack(ref["pixel_values"])))


def test_multi_turn_encoding_is_the_rendered_conversation(proc):
    """Message-by-message encoding gives the ids of the whole conversation rendered by the chat template."""
    scene = make_scene("train", 3)
    turns = [(q, a) for q, a, _ in scene.qa] + [("describe the image .", scene.caption)]
    messages = []
    for k, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    text = proc.apply_chat_template(messages).replace("<image>", "<image>" * NUM_VISUAL_TOKENS)
    enc = ConversationEncoder(proc).encode(turns)
    assert enc.ids == proc.tokenizer(text).input_ids
    answers = [x for x in enc.labels if x != -100]
    assert answers == proc.tokenizer(" </s> ".join(a for _, a in turns) + " </s>", add_special_tokens=False).input_ids


def test_question_read_back_targets_point_at_the_answer_position(proc):
    """The read-back loss sees each turn's last prompt token and that turn's question words."""
    tok = proc.tokenizer
    turns = [("what color is the circle ?", "red"), ("how many squares are there ?", "2")]
    enc = ConversationEncoder(proc).encode(turns)
    ids, labels = enc.ids, enc.labels
    assert len(enc.turns) == 2
    for (pos, words), (q, a) in zip(enc.turns, turns):
        assert tok.convert_ids_to_tokens(ids[pos - 1 : pos + 1]) == ["assistant", ":"]
        assert labels[pos] == -100 and labels[pos + 1] == tok.get_vocab()[a]  # next token is the answer
        assert tok.convert_ids_to_tokens(words) == q.split()
        assert ids[pos - 2 - len(words) + 1 : pos - 1] == words


def _args(**kw):
    return SimpleNamespace(**{"question_draws": 2, "relation_boost": 0, "max_turns": 99, "caption_prob": 0.25, **kw})


def test_question_draws_add_distinct_questions(proc):
    encoder = ConversationEncoder(proc)
    b1 = make_batch(encoder, [5, 6], random.Random(0), _args(caption_prob=0))
    b3 = make_batch(encoder, [5, 6], random.Random(0), _args(caption_prob=0, question_draws=3))
    n1 = int((b1["question_pos"] >= 0).sum())
    n3 = int((b3["question_pos"] >= 0).sum())
    assert n3 > n1
    for i in range(2):  # no question repeated within a sequence
        pos = [p for p in b3["question_pos"][i].tolist() if p >= 0]
        qs = [tuple(w for w in b3["question_words"][i, t].tolist() if w != -100) for t in range(len(pos))]
        assert len(set(qs)) == len(qs)


def test_caption_turn_is_last_and_has_no_referent(proc):
    b = make_batch(ConversationEncoder(proc), [7], random.Random(0), _args(caption_prob=1))
    last = int((b["question_pos"][0] >= 0).sum()) - 1
    caption = [w for w in b["question_words"][0, last].tolist() if w != -100]
    assert proc.tokenizer.convert_ids_to_tokens(caption) == "describe the image .".split()
    assert (b["question_referent"][0, last] == -100).all()


def test_batch_pixels_are_the_processors(proc):
    b = make_batch(ConversationEncoder(proc), [7, 8], random.Random(0), _args())
    images = [make_scene("train", i).image for i in (7, 8)]
    ref = proc(text=["<image>"] * 2, images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(b["pixel_values"], ref)
