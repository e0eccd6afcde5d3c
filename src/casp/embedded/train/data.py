"""Training batches of the embedded model: scenes -> conversations -> token ids and targets.

Each training sequence is one scene as a multi-turn conversation in the processor's own chat
template (LLaVA-1.5):

    <s> USER: <image>x64 q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...

with every question of the scene and of ``--question-draws - 1`` further draws about the same
image (repeats dropped, shuffled, at most ``--max-turns``) and, with probability
``--caption-prob``, the caption request as the last turn. The loss is on answer / caption
tokens and their ``</s>`` only. Scenes are generated on the fly from the train split, which is
disjoint from the test split by content.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from casp.embedded.build import NUM_VISUAL_TOKENS
from casp.embedded.scenes import CAPTION_PROMPT, Question, draw_questions, make_scene, swap_relation
from casp.embedded.train.probes import (
    QUESTION_SLOTS,
    REFERENT_FIELDS,
    SECOND_FIELDS,
    referent_targets,
    scene_counts,
    stack_patch_targets,
)


@dataclass
class Encoded:
    """One conversation's token ids, loss labels (-100: no loss) and, per turn,
    (index of its last prompt token, where the answer is predicted; its question's token ids)."""

    ids: list[int]
    labels: list[int]
    turns: list[tuple[int, list[int]]]


class ConversationEncoder:
    """Token ids of training conversations, from the processor's chat template and tokenizer.

    The template renders each message on its own (nothing in it looks at neighbouring
    messages), so every message is rendered and tokenised separately and the pieces joined:
    the ids equal those of the whole rendered conversation, and the answer tokens are known
    without searching the ids. ``<image>`` is expanded to the visual tokens as the processor does.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad = self.tokenizer.pad_token_id
        self.image_tokens = processor.image_token * NUM_VISUAL_TOKENS
        probe = [{"role": "user", "content": "?"}]
        plain, prompted = (self.tokenizer(processor.apply_chat_template(probe, add_generation_prompt=g),
                                          add_special_tokens=False).input_ids for g in (False, True))
        self.reply_prefix = prompted[len(plain):]  # the generation prompt, "ASSISTANT:"

    def encode(self, turns: list[tuple[str, str]]) -> Encoded:
        """(question, answer) turns about one image, the image in the first."""
        messages = []
        for k, (q, a) in enumerate(turns):
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        pieces = [p.replace(self.processor.image_token, self.image_tokens)
                  for p in self.processor.apply_chat_template([[m] for m in messages])]
        head = self.tokenizer(pieces[0]).input_ids  # with the <s> the tokenizer prepends
        rest = self.tokenizer(pieces[1:] + [q for q, _ in turns], add_special_tokens=False).input_ids
        messages_ids, question_ids = [head] + rest[: len(pieces) - 1], rest[len(pieces) - 1:]
        ids, labels, answer_at = [], [], []
        for user, reply in zip(messages_ids[::2], messages_ids[1::2]):
            answer = reply[len(self.reply_prefix):]
            ids += user + self.reply_prefix
            answer_at.append(len(ids) - 1)
            ids += answer
            labels += [-100] * (len(user) + len(self.reply_prefix)) + answer
        return Encoded(ids, labels, list(zip(answer_at, question_ids)))


def pixel_values(processor, scenes) -> torch.Tensor:
    """The scenes' images as the model sees them: the processor's own image preprocessing."""
    return processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]


def max_objects_at(step: int, args) -> int:
    """Curriculum: 1 object for the first quarter of --curriculum steps, then 2, then 3, then all (4)."""
    if step >= args.curriculum:
        return 4
    return 1 + (4 * step) // args.curriculum


def training_turns(scene, index: int, rng: random.Random, args) -> list[Question]:
    """The turns of scene ``index``'s training conversation (see the module docstring)."""
    turns = list(scene.questions)
    seen = {q.text for q in turns}
    for draw in range(1, args.question_draws):  # more questions about the same image, no repeats
        for q in draw_questions(scene.objects, np.random.default_rng([index, draw])):
            if q.text not in seen:
                seen.add(q.text)
                turns.append(q)
    # extra relation questions from a sibling scene draw would change the image; instead
    # repeat the scene's relation questions with swapped operands for more relational signal
    relations = [q for q in scene.questions if q.type == "relation"]
    for _ in range(args.relation_boost):
        turns += [swap_relation(q) for q in relations]
    rng.shuffle(turns)
    turns = turns[: args.max_turns]
    if rng.random() < args.caption_prob:
        # last, so no question can be answered by copying from the caption text
        turns.append(Question(CAPTION_PROMPT, scene.caption, "caption"))
    return turns


def make_batch(encoder: ConversationEncoder, indices: list[int], rng: random.Random, args,
               max_objects: int = 4) -> dict:
    """Model inputs and every target for the train scenes ``indices``.

    Keys: the model's ``input_ids``, ``attention_mask``, ``pixel_values``; ``labels``;
    ``patch_targets``; per turn ``question_pos`` (answer position, -1 = no turn),
    ``question_words`` and ``question_referent``; per scene ``scene_counts``.
    """
    scenes = [make_scene("train", idx, max_objects=max_objects) for idx in indices]
    convs = [training_turns(scene, idx, rng, args) for scene, idx in zip(scenes, indices)]
    seqs = [encoder.encode([(q.text, q.answer) for q in turns]) for turns in convs]
    L = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), L), encoder.pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    n_turns = max(len(s.turns) for s in seqs)
    q_pos = torch.full((len(seqs), n_turns), -1, dtype=torch.long)
    q_words = torch.full((len(seqs), n_turns, QUESTION_SLOTS), -100, dtype=torch.long)
    n_ref = len(REFERENT_FIELDS) + len(SECOND_FIELDS)
    q_ref = torch.full((len(seqs), n_turns, n_ref), -100, dtype=torch.long)
    for i, (s, turns) in enumerate(zip(seqs, convs)):
        refs = [referent_targets(q) for q in turns]
        q_ref[i, : len(refs)] = torch.tensor(refs, dtype=torch.long).view(len(refs), n_ref)
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.ids)] = torch.tensor(s.labels)
        mask[i, : len(s.ids)] = 1
        for t, (pos, words) in enumerate(s.turns):
            q_pos[i, t] = pos
            q_words[i, t, : len(words)] = torch.tensor(words[:QUESTION_SLOTS])
    pix = pixel_values(encoder.processor, scenes)
    counts = [scene_counts(sc.objects) for sc in scenes]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "labels": labels,
            "patch_targets": stack_patch_targets(scenes), "question_pos": q_pos, "question_words": q_words,
            "question_referent": q_ref, "scene_counts": torch.tensor(counts, dtype=torch.long)}
