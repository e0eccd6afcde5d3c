import pytest
import torch


@pytest.fixture(scope="session")
def llama_256_dir(tmp_path_factory):
    """A random Llama whose decoder linears are large enough for the CPU kernels (256x256 and up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from casp.embedded.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("llama256")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
