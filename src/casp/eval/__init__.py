"""Evaluation: VQA accuracy, caption perplexity and KL for VLMs (vqa), text perplexity (text_ppl)."""
