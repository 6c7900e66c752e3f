import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny_model():
    """A random Llama with GQA (4 query heads, 2 KV heads, head_dim 32): fast on CPU."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted from GGUF once, then cached)."""
    from kvlab.models import load_model

    return load_model("smollm2-135m")
