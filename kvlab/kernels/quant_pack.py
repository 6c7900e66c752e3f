"""Quantize + pack kernels: new keys or values to the codecs' packed fields in one launch.

Keys: one program per (block of ``G`` tokens, batch row x head) reduces min/max per channel,
ranks channels by sum |k| over the block for Kitty's boost (top ``NB`` become
``boost_bits`` wide), and writes ``lo`` / ``hi`` bit planes packed along tokens, fp16
scale/zero and the sorted boosted-channel indices. Values: one program per (``BT`` tokens,
batch row x head) quantizes per-token groups of ``GV`` channels and packs along tokens, four
byte rows interleaved per channel (``ValueTokenCodec``).

The arithmetic mirrors :mod:`kvlab.quant.uniform` step by step (fp32, IEEE division,
round half to even, fp16 scale and zero), so codes, scales and zeros are bit-identical with
``KeyChannelCodec.encode`` / ``ValueTokenCodec.encode``. One documented difference: the boost
ranking sums |k| in another order than ``torch.mean``, so two channels whose means agree to
fp32 rounding may be ranked the other way (a near-tie; either choice is a valid top-k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.decode_attention import triton_interpreting
from kvlab.quant.codecs import Fields, KeyChannelCodec, ValueTokenCodec
from kvlab.quant.uniform import _TINY

TINY = tl.constexpr(_TINY)


@triton.jit
def _round_half_even(y):
    r = tl.floor(y)
    frac = y - r
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


@triton.jit
def _codes(x, mn, mx, levels):
    """uniform.quantize_levels: (codes int32, scale fp16, zero fp16); mn/mx/levels broadcast against x."""
    scale = tl.maximum(tl.math.div_rn(mx - mn, levels), TINY).to(tl.float16)
    zero = mn.to(tl.float16)
    y = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))
    codes = tl.minimum(tl.maximum(_round_half_even(y), 0.0), levels)
    return codes.to(tl.int32), scale, zero


@triton.jit
def _pack_rows(codes, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS]`` codes -> ``[ROWS // (8 // BITS), COLS]`` bytes (consecutive rows share a byte)."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        return codes.to(tl.uint8)
    shifts = tl.arange(0, PER) * BITS
    c = tl.reshape(codes, (ROWS // PER, PER, COLS))
    return tl.sum(c << shifts[None, :, None], axis=1).to(tl.uint8)


@triton.jit
def _key_block(x, d, BITS: tl.constexpr, NB: tl.constexpr, HBITS: tl.constexpr, DC: tl.constexpr):
    """Codes, fp16 scale/zero per channel, and the boosted-channel flags of one key block ``x [G, DC]``."""
    levels = tl.full((DC,), (1 << BITS) - 1, tl.float32)
    boosted = levels < 0
    if NB > 0:
        a = tl.sum(tl.abs(x), axis=0)
        # rank of each channel by (mean |k| descending, channel ascending); the top NB are boosted
        beats = (a[None, :] > a[:, None]) | ((a[None, :] == a[:, None]) & (d[None, :] < d[:, None]))
        boosted = tl.sum(beats.to(tl.int32), axis=1) < NB
        levels = tl.where(boosted, (1 << (BITS + HBITS)) - 1, levels)
    codes, scale, zero = _codes(x, tl.min(x, axis=0)[None, :], tl.max(x, axis=0)[None, :], levels[None, :])
    return codes, scale, zero, boosted


@triton.jit
def _store_key_block(blk, codes, scale, zero, boosted, d, lo_ptr, s_ptr, z_ptr, hi_ptr, idx_ptr, ok,
                     G: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr,
                     HBITS: tl.constexpr):
    """Writes a block's fields at block row ``blk`` of contiguous ``[.., blocks, ..]`` storage where the
    per-channel flags ``ok [DC]`` hold."""
    tl.store(s_ptr + blk * D + d, tl.reshape(scale, (DC,)), mask=ok)
    tl.store(z_ptr + blk * D + d, tl.reshape(zero, (DC,)), mask=ok)
    PER: tl.constexpr = 8 // BITS
    rows = blk * (G // PER) + tl.arange(0, G // PER)
    tl.store(lo_ptr + rows[:, None] * D + d[None, :], _pack_rows(codes & ((1 << BITS) - 1), BITS, G, DC),
             mask=ok[None, :])
    if NB > 0:
        col = tl.cumsum(boosted.to(tl.int32), axis=0) - 1  # position among the boosted, by channel
        HPER: tl.constexpr = 8 // HBITS
        hrows = blk * (G // HPER) + tl.arange(0, G // HPER)
        tl.store(hi_ptr + hrows[:, None] * NB + col[None, :], _pack_rows(codes >> BITS, HBITS, G, D),
                 mask=(boosted & ok)[None, :])
        tl.store(idx_ptr + blk * NB + col, d.to(tl.int16), mask=boosted & ok)


@triton.jit
def _value_codes(x, BT: tl.constexpr, D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr):
    """Per-token groups of ``GV`` channels of ``x [BT, D]``: codes ``[BT, D]``, scale/zero ``[BT, D / GV]``."""
    NG: tl.constexpr = D // GV
    x = tl.reshape(x.to(tl.float32), (BT, NG, GV))
    codes, scale, zero = _codes(x, tl.min(x, axis=2)[:, :, None], tl.max(x, axis=2)[:, :, None],
                                tl.full((1, 1, 1), (1 << BITS) - 1, tl.float32))
    return tl.reshape(codes, (BT, D)), tl.reshape(scale, (BT, NG)), tl.reshape(zero, (BT, NG))


@triton.jit
def _store_value_tokens(t0, end, codes, scale, zero, c_ptr, s_ptr, z_ptr, D: tl.constexpr, GV: tl.constexpr,
                        BITS: tl.constexpr, BT: tl.constexpr):
    """Writes tokens ``t0 .. t0 + BT - 1`` below ``end`` (both multiples of the codec's block) into one (batch,
    head)'s fields: codes packed along tokens, byte row ``R`` of channel ``c`` at ``(R // 4) * 4 D + 4 c + R % 4``."""
    NG: tl.constexpr = D // GV
    t = t0 + tl.arange(0, BT)
    g = tl.arange(0, NG)
    tl.store(s_ptr + t[:, None] * NG + g[None, :], scale, mask=(t < end)[:, None])
    tl.store(z_ptr + t[:, None] * NG + g[None, :], zero, mask=(t < end)[:, None])
    PER: tl.constexpr = 8 // BITS
    row = t0 // PER + tl.arange(0, BT // PER)
    c = tl.arange(0, D)
    tl.store(c_ptr + ((row // 4) * (4 * D) + row % 4)[:, None] + 4 * c[None, :], _pack_rows(codes, BITS, BT, D),
             mask=(row * PER < end)[:, None])


@triton.jit(do_not_specialize=["sxb", "sxh", "sxt", "n_blocks"])
def _quant_keys_kernel(x_ptr, sxb, sxh, sxt, lo_ptr, s_ptr, z_ptr, hi_ptr, idx_ptr, n_blocks,
                       H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BITS: tl.constexpr,
                       NB: tl.constexpr, HBITS: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    t = tl.arange(0, G)
    d = tl.program_id(2) * DC + tl.arange(0, DC)  # this program's channels (all D when boosting: DC == D)
    x = tl.load(x_ptr + b * sxb + h * sxh + (blk * G + t)[:, None] * sxt + d[None, :]).to(tl.float32)
    codes, scale, zero, boosted = _key_block(x, d, BITS, NB, HBITS, DC)
    _store_key_block(bh * n_blocks + blk, codes, scale, zero, boosted, d, lo_ptr, s_ptr, z_ptr, hi_ptr, idx_ptr,
                     d >= 0, G, D, DC, BITS, NB, HBITS)


@triton.jit(do_not_specialize=["sxb", "sxh", "sxt", "T"])
def _quant_values_kernel(x_ptr, sxb, sxh, sxt, c_ptr, s_ptr, z_ptr, T,
                         H: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, GV: tl.constexpr,
                         BITS: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    t0 = tl.program_id(0) * BT
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, D)
    x = tl.load(x_ptr + b * sxb + h * sxh + t[:, None] * sxt + d[None, :], mask=(t < T)[:, None], other=0.0)
    codes, scale, zero = _value_codes(x, BT, D, GV, BITS)
    _store_value_tokens(t0, T, codes, scale, zero, c_ptr + bh * T * D * BITS // 8, s_ptr + bh * T * (D // GV),
                        z_ptr + bh * T * (D // GV), D, GV, BITS, BT)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _usable(x: torch.Tensor) -> bool:
    return (x.device.type == "cuda" or triton_interpreting()) and x.stride(3) == 1 and _is_pow2(x.shape[3])


def quantize_pack_keys(codec: KeyChannelCodec, x: torch.Tensor) -> Fields:
    """``KeyChannelCodec.encode`` in one kernel: ``x [B, H, T, D]`` with ``T`` a multiple of ``G``."""
    B, H, T, D = x.shape
    G, NB = codec.group_size, codec.boost_channels
    if not (_usable(x) and _is_pow2(G)) or T % G:
        return codec.encode(x)
    n_blocks = T // G
    hbits = codec.boost_bits - codec.bits
    kw = dict(device=x.device)
    fields: Fields = {
        "lo": torch.empty(B, H, T * codec.bits // 8, D, dtype=torch.uint8, **kw),
        "scale": torch.empty(B, H, n_blocks, D, dtype=torch.float16, **kw),
        "zero": torch.empty(B, H, n_blocks, D, dtype=torch.float16, **kw),
    }
    if NB:
        fields["idx"] = torch.empty(B, H, n_blocks, NB, dtype=torch.int16, **kw)
        fields["hi"] = torch.empty(B, H, T * hbits // 8, NB, dtype=torch.uint8, **kw)
    if T == 0:
        return fields
    # Without boost every channel is independent: programs of 32 channels (4x the programs, a
    # quarter of the registers each). The boost ranks all channels of a block in one program.
    DC = D if NB else min(D, 32)
    _quant_keys_kernel[(n_blocks, B * H, D // DC)](
        x, x.stride(0), x.stride(1), x.stride(2), fields["lo"], fields["scale"], fields["zero"],
        fields.get("hi", fields["lo"]), fields.get("idx", fields["lo"]), n_blocks,
        H=H, G=G, D=D, DC=DC, BITS=codec.bits, NB=NB, HBITS=max(1, hbits), num_warps=8 if DC * G >= 8192 else 4,
    )
    return fields


def quantize_pack_values(codec: ValueTokenCodec, x: torch.Tensor) -> Fields:
    """``ValueTokenCodec.encode`` in one kernel: ``x [B, H, T, D]``, ``T`` a multiple of the codec's block."""
    B, H, T, D = x.shape
    GV = codec.group_size
    if not (_usable(x) and _is_pow2(GV)) or D % GV or T % codec.block_tokens:
        return codec.encode(x)
    kw = dict(device=x.device)
    fields: Fields = {
        "codes": torch.empty(B, H, T // codec.block_tokens, 4 * D, dtype=torch.uint8, **kw),
        "scale": torch.empty(B, H, T, D // GV, dtype=torch.float16, **kw),
        "zero": torch.empty(B, H, T, D // GV, dtype=torch.float16, **kw),
    }
    if T == 0:
        return fields
    BT = max(16, codec.block_tokens)
    _quant_values_kernel[(triton.cdiv(T, BT), B * H)](
        x, x.stride(0), x.stride(1), x.stride(2), fields["codes"], fields["scale"], fields["zero"], T,
        H=H, BT=BT, D=D, GV=GV, BITS=codec.bits, num_warps=4,
    )
    return fields
