"""Kernels of the static (CUDA-graph) decode path, :mod:`kvlab.static`.

Every length comes from the device: row ``*step`` of a layer's schedule ``meta`` (columns in
:mod:`kvlab.kernels.decode_attention`: ``META_*``), so one recorded launch serves every step.

* :func:`static_update` (quantized layers): one program per (batch row, KV head) quantizes the
  key block that leaves the tail this step (if any) into the preallocated key store, the value
  block that leaves the value tail (if any) into the value store, and writes the new token's
  key and value into the tail rings. Same arithmetic as :mod:`.quant_pack` (bit-identical codes).
* :func:`dense_append`: the new token into a dense ``[B, H, capacity, D]`` buffer at row ``L - 1``.
* :func:`dense_attend`: flash-decoding over the first ``L`` rows of dense buffers, GQA-aware,
  with the same partials and merge (by the last program of a pair, or the merge kernel) as the packed
  decode kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvlab.kernels.decode_attention import (
    _TL_DTYPE,
    LOG2E,
    _merge_if_last,
    _num_sms,
    _pow2,
    combine,
    merge_chunk,
    partials,
    safe_dot,
)
from kvlab.kernels.quant_pack import _key_block, _store_key_block, _store_value_tokens, _value_codes


@triton.jit
def _meta_row(step_ptr, meta_ptr):
    row = meta_ptr + tl.load(step_ptr) * 8
    return tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit(do_not_specialize=["snb", "snh", "svb", "svh", "KR", "VR", "kblocks", "vc_bh", "vs_bh"])
def _static_update_kernel(kn_ptr, vn_ptr, snb, snh, svb, svh, kring, vring, KR, VR,
                          lo_ptr, ks_ptr, kz_ptr, hi_ptr, idx_ptr, kblocks, vc_ptr, vs_ptr, vz_ptr, vc_bh, vs_bh,
                          step_ptr, meta_ptr,
                          H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr,
                          HBITS: tl.constexpr, VBITS: tl.constexpr, GV: tl.constexpr, VB: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    _, Tk, Tv, Rk, kf, vf = _meta_row(step_ptr, meta_ptr)
    d = tl.arange(0, D)
    kring += bh * KR * D
    vring += bh * VR * D
    # The key block that left the tail (tokens Tk - G .. Tk - 1; Tk counts it already), once every
    # G steps: a scalar branch, so the other steps skip the block's loads and arithmetic.
    if kf != 0:
        t = Tk - G + tl.arange(0, G)
        x = tl.load(kring + (t % KR)[:, None] * D + d[None, :]).to(tl.float32)
        codes, scale, zero, boosted = _key_block(x, d, BITS, NB, HBITS, D)
        _store_key_block(bh * kblocks + (Tk - G) // G, codes, scale, zero, boosted, d, lo_ptr, ks_ptr, kz_ptr,
                         hi_ptr, idx_ptr, d >= 0, G, D, D, BITS, NB, HBITS)
    # The value block that left the value tail (tokens Tv - VB .. Tv - 1), once every VB steps.
    if vf != 0:
        tv = Tv - VB + tl.arange(0, VB)
        xv = tl.load(vring + (tv % VR)[:, None] * D + d[None, :])
        codes, vscale, vzero = _value_codes(xv, VB, D, GV, VBITS)
        _store_value_tokens(Tv - VB, Tv, codes, vscale, vzero, vc_ptr + bh * vc_bh, vs_ptr + bh * vs_bh,
                            vz_ptr + bh * vs_bh, D, GV, VBITS, VB)
    # The new token (last of the key tail) into both rings; its slot differs from the flushed ones.
    tn = Tk + Rk - 1
    tl.store(kring + (tn % KR) * D + d, tl.load(kn_ptr + b * snb + h * snh + d))
    tl.store(vring + (tn % VR) * D + d, tl.load(vn_ptr + b * svb + h * svh + d))


def static_update(layer, key: torch.Tensor, value: torch.Tensor, step: torch.Tensor, meta: torch.Tensor) -> None:
    """Flush and append for one decode token (``key``/``value`` ``[B, H, 1, D]``) of a static quantized layer."""
    B, H, _, D = key.shape
    kc, vc = layer.key_codec, layer.value_codec
    kf, vf = layer.key_store.buffers(), layer.value_store.buffers()
    NB = kc.boost_channels
    _static_update_kernel[(B * H,)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer.key_ring, layer.value_ring, layer.key_ring.shape[2], layer.value_ring.shape[2],
        kf["lo"], kf["scale"], kf["zero"], kf.get("hi", kf["lo"]), kf.get("idx", kf["lo"]), kf["scale"].shape[2],
        vf["codes"], vf["scale"], vf["zero"], vf["codes"][0, 0].numel(), vf["scale"][0, 0].numel(),
        step, meta,
        H=H, G=kc.group_size, D=D, BITS=kc.bits, NB=NB, HBITS=max(1, kc.boost_bits - kc.bits), VBITS=vc.bits,
        GV=vc.group_size, VB=vc.block_tokens, num_warps=8 if kc.group_size * D >= 8192 else 4,
    )


@triton.jit(do_not_specialize=["snb", "snh", "svb", "svh", "cap"])
def _dense_append_kernel(kn_ptr, vn_ptr, snb, snh, svb, svh, kbuf, vbuf, cap, step_ptr, meta_ptr,
                         H: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    S, Tk, _, Rk, _, _ = _meta_row(step_ptr, meta_ptr)
    d = tl.arange(0, D)
    row = bh * cap + S + Tk + Rk - 1
    tl.store(kbuf + row * D + d, tl.load(kn_ptr + b * snb + h * snh + d))
    tl.store(vbuf + row * D + d, tl.load(vn_ptr + b * svb + h * svh + d))


def dense_append(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 step: torch.Tensor, meta: torch.Tensor) -> None:
    B, H, cap, D = keys.shape
    _dense_append_kernel[(B * H,)](key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                                   keys, values, cap, step, meta, H=H, D=D, num_warps=1)


@triton.jit(do_not_specialize=["sq_b", "sq_h", "cap", "sm_b", "TPS", "so_b", "so_h"])
def _dense_decode_kernel(q_ptr, sq_b, sq_h, k_ptr, v_ptr, cap, mask_ptr, sm_b, pm_ptr, pl_ptr, pacc_ptr,
                         out_ptr, so_b, so_h, ticket_ptr, step_ptr, meta_ptr, TPS, qk_scale,
                         HKV: tl.constexpr, N_REP: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                         BN: tl.constexpr, HAS_MASK: tl.constexpr, DTYPE: tl.constexpr, MERGE_RP: tl.constexpr,
                         MERGE_CH: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    S, Tk, _, Rk, _, _ = _meta_row(step_ptr, meta_ptr)
    L = S + Tk + Rk
    rows = tl.arange(0, M_PAD)
    row_ok = rows < N_REP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (h * N_REP + rows)[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(DTYPE)
    base = pid_bh.to(tl.int64) * cap * D
    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    acc = tl.zeros((M_PAD, D), tl.float32)
    start = pid_s * TPS
    end = tl.minimum(start + TPS, L)
    for t0 in range(start, end, BN):
        t = t0 + tl.arange(0, BN)
        ok = t < end
        k = tl.load(k_ptr + base + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        s = safe_dot(q, tl.trans(k)) * qk_scale
        keep = row_ok[:, None] & ok[None, :]
        if HAS_MASK:
            keep &= tl.load(mask_ptr + b * sm_b + t, mask=ok, other=0)[None, :] != 0
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + safe_dot(p.to(DTYPE), v)
        m_i = m_new
    n_parts = tl.num_programs(0)
    part = (pid_bh.to(tl.int64) * n_parts + pid_s) * N_REP
    tl.store(pm_ptr + part + rows, m_i, mask=row_ok)
    tl.store(pl_ptr + part + rows, l_i, mask=row_ok)
    tl.store(pacc_ptr + (part + rows)[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
    if MERGE_CH > 0:
        mrows = tl.arange(0, MERGE_RP)
        _merge_if_last(ticket_ptr + pid_bh, n_parts, pm_ptr, pl_ptr, pacc_ptr, pid_bh.to(tl.int64) * n_parts * N_REP,
                       mrows, mrows < N_REP, out_ptr + b * so_b + (h * N_REP + mrows) * so_h, N_REP, D, MERGE_RP,
                       MERGE_CH)


def dense_split(capacity: int, bh: int, device: torch.device, block: int = 64) -> tuple[int, int]:
    """(tokens per program, programs per (batch, KV head)): ~4 programs per SM, >= 2 blocks each."""
    want = max(1, -(-4 * _num_sms(device) // bh))
    tps = max(2 * block, -(-capacity // want))
    tps = -(-tps // block) * block
    return tps, -(-capacity // tps)


def dense_attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                 scaling: float | None, step: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``query [B, Hq, 1, D]`` over the first ``L`` rows of ``keys``/``values``
    ``[B, H, capacity, D]`` (``L`` from ``meta[step]``) -> ``[B, 1, Hq, D]``."""
    B, HQ, QLEN, D = query.shape
    HKV, cap = keys.shape[1], keys.shape[2]
    n_rep = HQ // HKV
    tps, n_split = dense_split(cap, B * HKV, query.device)
    dev = query.device
    pm, pl, pacc, tickets = partials(B * HKV, n_split, n_rep, D, dev)
    out = torch.empty(B, QLEN, HQ, D, dtype=query.dtype, device=dev)
    merge_ch = merge_chunk(n_split, _pow2(n_rep), D, 4)
    scale = (scaling if scaling is not None else 1.0 / math.sqrt(D)) * LOG2E
    q = query if query.stride(3) == 1 else query.contiguous()
    mask = valid.view(torch.uint8) if valid is not None else pm
    _dense_decode_kernel[(n_split, B * HKV)](
        q, q.stride(0), q.stride(1), keys, values, cap, mask, valid.stride(0) if valid is not None else 0,
        pm, pl, pacc, out, out.stride(0), out.stride(2), tickets, step, meta, tps, scale,
        HKV=HKV, N_REP=n_rep, M_PAD=max(16, _pow2(n_rep)), D=D, BN=64, HAS_MASK=valid is not None,
        DTYPE=_TL_DTYPE[query.dtype], MERGE_RP=_pow2(n_rep), MERGE_CH=merge_ch, num_warps=4, num_stages=3,
    )
    if not merge_ch:
        combine(pm, pl, pacc, out, HKV, n_rep, n_split)
    return out
