"""kvlab: compressed KV caches for HuggingFace transformers, and a bench to measure them."""

from kvlab.cache import CompressedCache, make_cache
from kvlab.generate import generate
from kvlab.methods import build_method, parse_method
from kvlab.models import cache_kwargs

__all__ = ["CompressedCache", "make_cache", "generate", "build_method", "parse_method", "cache_kwargs"]
