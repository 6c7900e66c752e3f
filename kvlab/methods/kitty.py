"""Kitty-Pro: KIVI*-2 with a channel-wise precision boost of the keys.

For each block of G key tokens (per batch row, layer and KV head), the ``floor(boost_ratio *
head_dim)`` channels with the largest mean |k| over the block are stored at ``boost_bits``
instead of ``bits``, as in the Kitty artifact's simulation (``build_promote_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.methods.base import register
from kvlab.methods.kivi import Kivi
from kvlab.quant.codecs import KeyChannelCodec
from kvlab.quant.packing import PACKABLE_BITS


@register("kitty", presets={"kitty-pro": {}})
@dataclass(frozen=True)
class Kitty(Kivi):
    sinks: int = 32
    boost_ratio: float = 0.2
    boost_bits: int = 4

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.boost_ratio <= 1:
            raise ValueError(f"{self.label}: boost_ratio={self.boost_ratio} must be in [0, 1]")
        if self.boost_bits - self.bits not in PACKABLE_BITS:
            raise ValueError(
                f"{self.label}: boost_bits={self.boost_bits} with bits={self.bits} needs a high plane of "
                f"{self.boost_bits - self.bits} bits; valid differences are {PACKABLE_BITS}"
            )

    def boost_channels(self, head_dim: int) -> int:
        return int(head_dim * self.boost_ratio + 1e-6)

    def key_codec(self, head_dim: int) -> KeyChannelCodec:
        return KeyChannelCodec(self.bits, self.group_size, self.boost_channels(head_dim), self.boost_bits)
