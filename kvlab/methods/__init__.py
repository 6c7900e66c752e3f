"""Method registry: each method is one small class in its own file."""

from kvlab.methods import aquakv, axcore_kv, cab, fp16, h2o, hf_quanto, kitty, kivi, snapkv, streamingllm  # noqa: F401  (registration)
from kvlab.methods.base import PRESETS, REGISTRY, Method, build_method, parse_method

__all__ = ["PRESETS", "REGISTRY", "Method", "build_method", "parse_method"]
