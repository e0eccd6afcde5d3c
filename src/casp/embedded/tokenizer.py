"""Word-level tokenizer over the scene generator's closed vocabulary.

Built with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``
so it saves / loads as a standard ``tokenizer.json``. Like LLaVA-1.5's Llama
tokenizer it prepends ``<s>`` when ``add_special_tokens`` is true; the chat
template therefore does not contain ``<s>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from casp.embedded.scenes import vocabulary

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)  # ids 0..4 in this order
# Words of the prompt format "USER: <image>\n{question} ASSISTANT:" (lower-cased by the normaliser).
TEMPLATE_WORDS = ("user", "assistant", ":")


def build_vocab() -> dict[str, int]:
    """Token -> id: specials first, then template words, then the generator's words."""
    words = list(SPECIAL_TOKENS)
    for w in TEMPLATE_WORDS + tuple(vocabulary()):
        if w not in words:
            words.append(w)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded model's tokenizer (deterministic: same vocabulary, same ids)."""
    vocab = build_vocab()
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
