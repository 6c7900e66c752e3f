"""Bit-packing of integer codes of any width from 1 to 16 bits into uint8 rows.

Codes along the last dim form a little-endian bit stream: bit ``k`` of code ``i`` is
stream bit ``i * bits + k``, and stream bit ``t`` is bit ``t % 8`` of byte ``t // 8``.
For widths 1, 2, 4 and 8 this is the same layout as :mod:`kvlab.quant.packing`.
Each row is padded with zero bits to a whole byte, so rows can be sliced independently.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16


def packed_bytes(count: int, bits: int) -> int:
    """Bytes per row needed for ``count`` codes of ``bits`` bits."""
    return math.ceil(count * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into uint8 bytes."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"code width must be in [1, {MAX_BITS}] bits, got {bits}")
    device = codes.device
    shifts = torch.arange(bits, dtype=torch.int32, device=device)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).to(torch.uint8).flatten(-2)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*stream.shape[:-1], pad)], dim=-1)
    stream = stream.unflatten(-1, (-1, 8))
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=device)
    return (stream << byte_shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: sum == or


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of each row, as int64."""
    if packed.shape[-1] != packed_bytes(count, bits):
        raise ValueError(f"{count} codes of {bits} bits take {packed_bytes(count, bits)} bytes per row, "
                         f"got {packed.shape[-1]}")
    device = packed.device
    if 8 % bits == 0:  # whole codes per byte: shift and mask the bytes directly
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        codes = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
        return codes[..., :count].to(torch.int64)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).flatten(-2)[..., : count * bits]
    shifts = torch.arange(bits, dtype=torch.int64, device=device)
    return (stream.unflatten(-1, (count, bits)).to(torch.int64) << shifts).sum(-1)
