"""Token perplexity over non-overlapping windows, checked against a prefix-by-prefix hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from casp.eval.text_ppl import split_windows, text_perplexity

MAX_POS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def byte_tokenizer(text, add_special_tokens=False, verbose=True):
    """One token per UTF-8 byte, called like a Hugging Face tokenizer."""
    return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS)
    return LlamaForCausalLM(cfg).eval()


def hand_ppl(model, ids: list[int], ctx: int) -> tuple[float, int]:
    """Score every token but the first of each window from a fresh forward pass on its prefix."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        window = ids[start : start + ctx]
        for t in range(1, len(window)):
            with torch.no_grad():
                logits = model(torch.tensor([window[:t]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[window[t]].item()
            count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("n_chars, ctx", [(50, 10), (41, 10), (30, 7)])
def test_matches_hand_computation(tiny_llama, n_chars, ctx):
    text = "The quick brown fox jumps over the lazy dog. " * 2
    text = text[:n_chars]
    ids = list(text.encode())
    expected, count = hand_ppl(tiny_llama, ids, ctx)
    res = text_perplexity(tiny_llama, byte_tokenizer, text, context_length=ctx, progress=False)
    assert res["tokens"] == count
    assert res["context_length"] == ctx
    assert res["text_ppl"] == pytest.approx(expected, rel=1e-5)


def test_token_count_rule():
    # 41 tokens in windows of 10: four full windows (9 predictions each); the final single
    # token would predict nothing and is not a window.
    assert split_windows(41, 10) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert split_windows(43, 10)[-1] == (40, 43)  # a shorter last window is kept
    assert split_windows(1, 10) == []


def test_context_capped_by_max_positions_and_batching_invariant(tiny_llama):
    text = "abcdefghij" * 10  # 100 tokens
    one = text_perplexity(tiny_llama, byte_tokenizer, text, progress=False)
    assert one["context_length"] == MAX_POS
    assert one["tokens"] == 100 - math.ceil(100 / MAX_POS)
    many = text_perplexity(tiny_llama, byte_tokenizer, text, batch_size=3, progress=False)
    assert many["tokens"] == one["tokens"]
    assert many["text_ppl"] == pytest.approx(one["text_ppl"], rel=1e-5)


def test_max_tokens_and_training_mode_restored(tiny_llama):
    tiny_llama.train()
    try:
        res = text_perplexity(tiny_llama, byte_tokenizer, "x" * 200, context_length=8, max_tokens=17,
                              progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    assert res["tokens"] == 14 and res["windows"] == 2  # windows [0,8) and [8,16); token 16 alone


@pytest.mark.parametrize("kwargs, msg", [
    ({"text": ""}, "empty"),
    ({"text": "a"}, "nothing to predict"),
    ({"text": "abc", "context_length": 1}, "context_length"),
    ({"text": "abc", "batch_size": 0}, "batch_size"),
])
def test_errors(tiny_llama, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        text_perplexity(tiny_llama, byte_tokenizer, progress=False, **kwargs)
