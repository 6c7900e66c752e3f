"""KIVI: keys quantized per channel in blocks of G tokens, values per token; fp16 residual.

Presets follow the Kitty artifact's accuracy simulation (G = R = 128): ``kivi-2``, ``kivi-4``
and ``kivi*-2`` (32 fp16 attention sinks).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.cache import QuantizedLayer
from kvlab.methods.base import Method, register
from kvlab.quant.codecs import KeyChannelCodec, ValueTokenCodec
from kvlab.quant.packing import PACKABLE_BITS


@register("kivi", presets={"kivi-2": {"bits": 2}, "kivi-4": {"bits": 4}, "kivi*-2": {"bits": 2, "sinks": 32}})
@dataclass(frozen=True)
class Kivi(Method):
    bits: int = 2
    group_size: int = 128
    residual: int = 128
    sinks: int = 0

    def validate(self) -> None:
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"{self.label}: bits={self.bits} is not supported; choose one of {PACKABLE_BITS}")
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"{self.label}: group_size={self.group_size} must be a positive multiple of 8")
        if self.residual < self.group_size:
            raise ValueError(
                f"{self.label}: residual={self.residual} must be >= group_size={self.group_size} "
                "(the key block being filled lives in the full-precision residual)"
            )
        if self.sinks < 0:
            raise ValueError(f"{self.label}: sinks={self.sinks} must be >= 0")

    def value_group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        g = self.value_group(head_dim)
        if head_dim % g or g % (8 // self.bits):
            raise ValueError(
                f"{self.label}: value groups of min(group_size, head_dim)={g} channels do not tile "
                f"head_dim={head_dim}; use a group_size that divides {head_dim}"
            )

    def key_codec(self, head_dim: int) -> KeyChannelCodec:
        return KeyChannelCodec(self.bits, self.group_size)

    def value_codec(self, head_dim: int) -> ValueTokenCodec:
        return ValueTokenCodec(self.bits, self.value_group(head_dim))

    def make_layer(self, layer_idx: int, head_dim: int) -> QuantizedLayer:
        return QuantizedLayer(self.key_codec(head_dim), self.value_codec(head_dim), self.residual, self.sinks, layer_idx)

    def bits_per_value(self, head_dim: int) -> float:
        return (self.key_codec(head_dim).bits_per_value(head_dim) + self.value_codec(head_dim).bits_per_value(head_dim)) / 2

    def full_precision_tokens(self, length: int) -> int:
        return self.sinks + self.residual
