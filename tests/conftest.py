import logging
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging


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


@pytest.fixture()
def cache_deprecations():
    """A function listing what transformers has warned or logged so far in the test about the old cache keywords
    (``past_key_values=``/``cache_params=``, ``cache=`` in 5.25): warnings recorded every time, and the
    ``warning_once`` cache cleared so a message logged before this test is logged again."""
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    hf_logging.warning_once.cache_clear()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lambda: [m for m in logged + [str(w.message) for w in caught]
                           if "past_key_values" in m or "cache_params" in m]
    finally:
        root.removeHandler(handler)
