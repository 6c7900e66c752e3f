"""Block codecs of the quantized cache: how a run of tokens becomes packed fields and back.

A codec turns ``x: [B, H, T, D]`` into a dict of tensors whose dim 2 grows with ``T`` (so
stores can append along it) and decodes them back. ``KeyChannelCodec`` is KIVI's per-channel
key quantizer over blocks of ``G`` tokens, with Kitty's channel boost; ``ValueTokenCodec`` is
KIVI's per-token value quantizer over groups of channels, in blocks of a few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant import uniform
from kvlab.quant.packing import pack, unpack

Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyChannelCodec:
    """Per-channel quantization over blocks of ``group_size`` tokens.

    With ``boost_channels > 0``, the channels of each block (per batch row and head) with the
    largest mean |k| are quantized at ``boost_bits`` instead of ``bits``. Layout (Kitty's bit
    planes): ``lo`` holds the low ``bits`` of every channel's code, ``hi`` the high
    ``boost_bits - bits`` of the boosted channels, ``idx`` which channels those are. Codes are
    packed along tokens, so a byte holds consecutive tokens of one channel and a tile of
    tokens x channels is a contiguous, coalesced load.
    """

    bits: int
    group_size: int
    boost_channels: int = 0
    boost_bits: int = 4

    def encode(self, x: torch.Tensor) -> Fields:
        B, H, T, D = x.shape
        G = self.group_size
        blocks = x.reshape(B, H, T // G, G, D)
        levels = torch.full((D,), (1 << self.bits) - 1, device=x.device)
        fields: Fields = {}
        if self.boost_channels:
            idx = blocks.float().abs().mean(3).topk(self.boost_channels, dim=-1).indices  # [B,H,n,nb]
            idx = idx.sort(-1).values
            boosted = torch.zeros(B, H, T // G, D, dtype=torch.bool, device=x.device)
            boosted.scatter_(-1, idx, True)
            levels = torch.where(boosted, (1 << self.boost_bits) - 1, levels)
            fields["idx"] = idx.to(torch.int16)
        codes, scale, zero = uniform.quantize_levels(blocks, levels.unsqueeze(-2), dim=3)
        fields["lo"] = pack((codes & ((1 << self.bits) - 1)).reshape(B, H, T, D), self.bits, dim=2)
        if self.boost_channels:
            hi = codes.gather(-1, idx.unsqueeze(3).expand(-1, -1, -1, G, -1)) >> self.bits
            fields["hi"] = pack(hi.reshape(B, H, T, -1), self.boost_bits - self.bits, dim=2)
        fields["scale"], fields["zero"] = scale.squeeze(3), zero.squeeze(3)
        return fields

    def decode(self, fields: Fields, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack(fields["lo"], self.bits, dim=2)
        B, H, T, D = codes.shape
        G = self.group_size
        codes = codes.reshape(B, H, T // G, G, D)
        if self.boost_channels:
            hi = unpack(fields["hi"], self.boost_bits - self.bits, dim=2).reshape(B, H, T // G, G, -1)
            idx = fields["idx"].long().unsqueeze(3).expand(-1, -1, -1, G, -1)
            codes = codes.scatter_add(-1, idx, hi << self.bits)
        out = uniform.dequantize(codes, fields["scale"].unsqueeze(3), fields["zero"].unsqueeze(3), dtype)
        return out.reshape(B, H, T, D)

    def bits_per_value(self, head_dim: int) -> float:
        G = self.group_size
        scale_zero = 2 * 16 / G
        boost = self.boost_channels * ((self.boost_bits - self.bits) + 16 / G) / head_dim
        return self.bits + scale_zero + boost


@dataclass(frozen=True)
class ValueTokenCodec:
    """Per-token quantization over groups of ``group_size`` consecutive channels, in blocks of
    ``block_tokens`` tokens.

    Codes are packed along tokens, as the keys' are (a byte holds ``8 // bits`` consecutive tokens
    of one channel), and every four byte rows are interleaved per channel: ``codes [B, H, T /
    block_tokens, 4 * D]`` holds byte row ``4 u + s`` of channel ``c`` at ``[u, 4 c + s]``. A 32-bit
    word is then one channel's ``block_tokens`` consecutive tokens, the register fragment the decode
    kernel's value product needs with tokens as its reduction dimension. Scales and zeros are per
    token and group: ``[B, H, T, D / group_size]``.
    """

    bits: int
    group_size: int

    @property
    def block_tokens(self) -> int:
        return 4 * (8 // self.bits)

    def encode(self, x: torch.Tensor) -> Fields:
        B, H, T, D = x.shape
        if T % self.block_tokens:
            raise ValueError(f"{T} value tokens: {self.bits}-bit values are encoded in blocks of {self.block_tokens}")
        g = x.reshape(B, H, T, D // self.group_size, self.group_size)
        codes, scale, zero = uniform.quantize(g, self.bits, dim=4)
        rows = pack(codes.reshape(B, H, T, D), self.bits, dim=2)  # [B, H, T / per_byte, D]
        return {
            "codes": rows.reshape(B, H, -1, 4, D).transpose(3, 4).reshape(B, H, -1, 4 * D),
            "scale": scale.squeeze(4),
            "zero": zero.squeeze(4),
        }

    def codes(self, fields: Fields) -> torch.Tensor:
        """The integer codes ``[B, H, T, D]`` (uint8) of ``fields``."""
        packed = fields["codes"]
        B, H, n, D4 = packed.shape
        rows = packed.reshape(B, H, n, D4 // 4, 4).transpose(3, 4).reshape(B, H, 4 * n, D4 // 4)
        return unpack(rows, self.bits, dim=2)

    def decode(self, fields: Fields, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(self.codes(fields), fields, dtype)

    def dequantize(self, codes: torch.Tensor, fields: Fields, dtype: torch.dtype) -> torch.Tensor:
        """Integer ``codes [B, H, T, D]`` with the ``scale``/``zero`` of ``fields`` -> values in ``dtype``."""
        B, H, T, D = codes.shape
        codes = codes.reshape(B, H, T, D // self.group_size, self.group_size)
        out = uniform.dequantize(codes, fields["scale"].unsqueeze(4), fields["zero"].unsqueeze(4), dtype)
        return out.reshape(B, H, T, D)

    def bits_per_value(self, head_dim: int) -> float:
        return self.bits + 2 * 16 / self.group_size
