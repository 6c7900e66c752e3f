"""AQUA-KV (cross-layer predictors + HIGGS residuals) and its ablation without predictors.

Both keep ``prefix_size`` fp16 sinks and buffer new tokens in fp16 until ``recent_buffer_size``
have accumulated; the whole buffer is then compressed once (:mod:`kvlab.aquakv_cache`).

- ``higgs-2`` / ``higgs-3`` / ``higgs-4``: HIGGS with EDEN grids (d, n) = (2, 16), (2, 64),
  (2, 256), i.e. 2, 3, 4 index bits per value plus one fp16 scale per Hadamard group.
- ``aqua-kv``: needs ``predictors=<file>`` from ``kvlab calibrate``; ``edenn_d``, ``edenn_n``
  and ``hadamard_groupsize`` must be the ones the file was calibrated with. Layer 0 uses the
  file's first-layer quantizer (by default (2, 256): 4 bits).

``all_in_bits`` of aqua-kv counts the predictor weights (16 bits per parameter) amortised over
the cached values at that length, since the cache cannot decode without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from kvlab.aquakv_cache import BufferedBlockLayer, HiggsBlockCodec, PredictorBlockCodec, predictor_parameters
from kvlab.aquakv_file import load_predictors_file
from kvlab.methods.base import Method, register
from kvlab.quant.higgs import SCALE_DTYPE, HiggsQuantizer

PREDICTOR_PARAM_BITS = 16


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@register("higgs", presets={"higgs-2": {}, "higgs-3": {"edenn_n": 64}, "higgs-4": {"edenn_n": 256}})
@dataclass(frozen=True)
class Higgs(Method):
    prefix_size: int = 4
    recent_buffer_size: int = 128
    edenn_d: int = 2
    edenn_n: int = 16
    hadamard_groupsize: int = 64

    def validate(self) -> None:
        if self.prefix_size < 0:
            raise ValueError(f"{self.label}: prefix_size={self.prefix_size} must be >= 0")
        if self.recent_buffer_size < 1:
            raise ValueError(f"{self.label}: recent_buffer_size={self.recent_buffer_size} must be >= 1")
        if self.edenn_d < 1 or not _power_of_two(self.edenn_n) or not 2 <= self.edenn_n <= 2**16:
            raise ValueError(f"{self.label}: need edenn_d >= 1 and edenn_n a power of two in [2, 65536], "
                             f"got edenn_d={self.edenn_d}, edenn_n={self.edenn_n}")
        if not _power_of_two(self.hadamard_groupsize) or self.hadamard_groupsize % self.edenn_d:
            raise ValueError(f"{self.label}: hadamard_groupsize={self.hadamard_groupsize} must be a power of two "
                             f"divisible by edenn_d={self.edenn_d}")

    def check_head_dim(self, head_dim: int) -> None:
        if self.hadamard_groupsize < head_dim and head_dim % self.hadamard_groupsize:
            raise ValueError(f"{self.label}: hadamard_groupsize={self.hadamard_groupsize} does not tile "
                             f"head_dim={head_dim}")

    @cached_property
    def codec(self) -> HiggsBlockCodec:
        """Built on first use (the grid is computed once and cached on disk)."""
        return HiggsBlockCodec(HiggsQuantizer(self.edenn_d, self.edenn_n, self.hadamard_groupsize))

    def make_layer(self, layer_idx: int, head_dim: int) -> BufferedBlockLayer:
        return BufferedBlockLayer(self.codec, self.prefix_size, self.recent_buffer_size, layer_idx)

    def bits_per_value(self, head_dim: int) -> float:
        return math.log2(self.edenn_n) / self.edenn_d + torch.finfo(SCALE_DTYPE).bits / self.hadamard_groupsize

    def full_precision_tokens(self, length: int) -> int:
        return self.prefix_size + self.recent_buffer_size


@register("aqua-kv")
@dataclass(frozen=True)
class AquaKV(Higgs):
    predictors: str = ""

    @cached_property
    def codec(self) -> PredictorBlockCodec:  # type: ignore[override]
        """The predictors file, loaded once per method and checked against this method's quantizer."""
        if not self.predictors:
            raise ValueError("aqua-kv needs predictors=<file written by `kvlab calibrate`>, "
                             "e.g. aqua-kv:predictors=predictors.pt")
        loaded = load_predictors_file(self.predictors)
        q = loaded.predictors.quantizer
        if (q.d, q.n, q.group_size) != (self.edenn_d, self.edenn_n, self.hadamard_groupsize):
            raise ValueError(
                f"aqua-kv: {self.predictors} was calibrated with edenn_d={q.d}, edenn_n={q.n}, "
                f"hadamard_groupsize={q.group_size}; pass aqua-kv:edenn_d={q.d},edenn_n={q.n},"
                f"hadamard_groupsize={q.group_size},predictors=... or recalibrate")
        return PredictorBlockCodec(loaded.predictors, loaded.rope, self.predictors)

    def check_head_dim(self, head_dim: int) -> None:
        if self.codec.predictors.head_dim != head_dim:
            raise ValueError(f"aqua-kv: {self.predictors} was calibrated for {self.codec.describe()}; "
                             f"this model has head_dim {head_dim}")

    def make_layer(self, layer_idx: int, head_dim: int) -> BufferedBlockLayer:
        self.check_head_dim(head_dim)
        if layer_idx == 0:  # a new cache starts: its layers share one handoff
            object.__setattr__(self, "_handoff", self.codec.new_handoff())
        handoff = getattr(self, "_handoff", None)
        if handoff is None:
            raise ValueError("aqua-kv: layer 0 is not a full-attention layer; cross-layer prediction needs it")
        return BufferedBlockLayer(self.codec, self.prefix_size, self.recent_buffer_size, layer_idx, handoff)

    def bits_per_value(self, head_dim: int) -> float:
        if not self.predictors:
            return super().bits_per_value(head_dim)
        layers = self.codec.predictors.num_layers
        return sum(self.codec.bits_per_value(layer) for layer in range(layers)) / layers

    def predictor_bits_per_value(self, length: int) -> float:
        """Predictor weights amortised over the ``2 * layers * C * length`` values of a cache of ``length`` tokens."""
        p = self.codec.predictors
        return PREDICTOR_PARAM_BITS * predictor_parameters(p) / (2 * p.num_layers * p.width * length)

    def all_in_bits(self, length: int, head_dim: int) -> float:
        base = super().all_in_bits(length, head_dim)
        return base + self.predictor_bits_per_value(length) if self.predictors else base
