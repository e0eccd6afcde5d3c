"""Calibration samples of an image task score their answer alone (`casp.data.scored`)."""
from __future__ import annotations

import torch

from casp.data.scored import IGNORE, answer_labels, model_inputs, target_labels


def test_labels_keep_only_what_follows_the_prompt():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = answer_labels(ids, 3)
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9]]
    assert ids.tolist() == [[5, 6, 7, 8, 9]]          # the ids themselves are untouched
    assert "labels" not in model_inputs({"input_ids": ids, "labels": labels})


def test_unlabelled_samples_score_every_attended_text_token():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labelled = {"input_ids": ids, "labels": answer_labels(ids, 2)}
    assert target_labels(labelled, image_token_id=6).tolist() == [[IGNORE, IGNORE, 3], [IGNORE, IGNORE, 6]]
    targets = target_labels({"input_ids": ids, "attention_mask": mask}, image_token_id=5)
    assert targets.tolist() == [[1, 2, IGNORE], [4, IGNORE, 6]]


def test_question_records_score_their_answer_and_captions_everything(tiny_llava_dir, scene_jsonl):
    from casp.data.calibration import image_text_batches, read_calibration_jsonl
    from casp.eval.vqa import normalize_answer
    from casp.io.modelio import load_processor

    processor = load_processor(tiny_llava_dir)
    records = read_calibration_jsonl(scene_jsonl)[:4]
    for rec, batch in zip(records, image_text_batches(processor, records)):
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        kept = labels != IGNORE
        assert kept.any() and not kept[: kept.nonzero()[0]].any()     # one run of tokens at the end
        assert kept[-1]
        assert normalize_answer(processor.tokenizer.decode(ids[kept])) == normalize_answer(rec["answer"])
    caption = image_text_batches(processor, [{"image": records[0]["image"], "text": "a scene"}])[0]
    assert "labels" not in caption


def test_the_fisher_pass_scores_the_labelled_answer(tiny_llava_dir, scene_jsonl):
    from casp.analysis.sensitivity import output_fisher
    from casp.data.calibration import image_text_batches, read_calibration_jsonl
    from casp.io.modelio import load_model, load_processor
    from casp.models.adapters import adapter_for

    processor = load_processor(tiny_llava_dir)
    model = load_model(tiny_llava_dir)
    adapter = adapter_for(model)
    batches = image_text_batches(processor, read_calibration_jsonl(scene_jsonl)[:3])
    image = model.config.image_token_id
    every_token = [{**b, "labels": target_labels(model_inputs(b), image)} for b in batches]
    answers = output_fisher(model, adapter, batches, progress=False)
    everything = output_fisher(model, adapter, every_token, progress=False)
    unlabelled = output_fisher(model, adapter, [model_inputs(b) for b in batches], progress=False)
    assert answers.keys() == everything.keys() == unlabelled.keys()
    for name in answers:
        torch.testing.assert_close(everything[name], unlabelled[name])
    assert any(not torch.allclose(answers[n], everything[n], rtol=0.05) for n in answers)
