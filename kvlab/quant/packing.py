"""Bit-packing of small integer codes into uint8 along one dimension.

Codes of ``bits`` bits (1, 2, 4 or 8) are packed ``8 // bits`` to a byte; the code at
position ``i * per_byte + j`` along ``dim`` lands in bits ``[j * bits, (j + 1) * bits)``
of byte ``i``. The same layout is read by the Triton kernels.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths: {PACKABLE_BITS}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along ``dim`` into uint8."""
    per_byte = _check_bits(bits)
    dim = dim % codes.dim()
    n = codes.shape[dim]
    if n % per_byte:
        raise ValueError(f"length {n} along dim {dim} is not a multiple of {per_byte} ({bits}-bit codes)")
    c = codes.to(torch.uint8).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], n // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    packed = (c << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: sum == bitwise or
    return packed.movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 bytes to codes (uint8), ``8 // bits`` per byte."""
    per_byte = _check_bits(bits)
    dim = dim % packed.dim()
    p = packed.movedim(dim, -1).unsqueeze(-1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (p >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*p.shape[:-2], p.shape[-2] * per_byte)
    return codes.movedim(-1, dim)
