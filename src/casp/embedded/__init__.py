"""The embedded reference VLM: a tiny LLaVA trained on synthetic shape scenes.

``EMBEDDED_MODEL_DIR`` holds the shipped weights, config, tokenizer and processor
(a standard Hugging Face model directory); ``load_embedded_model`` loads it offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"


def load_embedded_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load the shipped ``LlavaForConditionalGeneration`` (eval mode) from ``EMBEDDED_MODEL_DIR``."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        EMBEDDED_MODEL_DIR, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.eval()


def load_embedded_processor():
    """Load the shipped ``LlavaProcessor`` (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)


__all__ = ["EMBEDDED_MODEL_DIR", "load_embedded_model", "load_embedded_processor"]
