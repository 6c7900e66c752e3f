"""Flash-decoding attention over a :class:`~kvlab.cache.QuantizedLayer`, read in its packed form.

A layer holds, per (batch row, KV head), ``[sinks | quantized | tail]`` for keys and for values,
with different quantized lengths (keys in whole blocks of ``G``, values in blocks of a few tokens,
so ``Tk >= Tv``). Two launches of one kernel (``ROLE``):

* one-warp lean programs stream tiles of ``BN`` = 64 tokens (within one key group) whose keys and
  values are both quantized. Keys and values are both packed along
  tokens (a byte holds ``PER`` consecutive tokens of one channel), so a tile is loaded once as
  packed bytes (``[BN / PER, D]`` key bytes, ``[D, BN / PER]`` value bytes, whose four-row
  interleave makes each 32-bit word one channel's next tokens) and never re-interleaved: bit field
  ``j`` of every byte is the sub-tile of tokens ``PER * r + j``. Logits are computed transposed,
  ``codes [tokens, D] @ (q * s)^T [D, rows]``: tokens on the MMA's M side (16 per product) and the
  query rows on its N side, padded to 8 instead of 16; values are the A operand of ``values^T
  [D, tokens] @ p^T [tokens, rows]``, channels on M, rows again on N. Padding rows cost half the
  MMAs and half the softmax work, every reduction over tokens is taken once per tile, and one
  accumulator ``[D, rows]`` serves every field. Codes become fp16 bit fields in place (one AND
  per two codes, no shift or int->float conversion), the key scale folds into the query
  (``q.k = (q * s).code + q.z``) and, when a value group spans the head (G >= head_dim, the
  default), the value scale folds into ``p`` (``sum_t p_t (c_t s_t + z_t) = (p * s) . c + sum_t
  p_t z_t``), so nothing is dequantized per element.
* up to ``N_GENERIC`` programs per (batch row, KV head) handle the rest (sinks, the zone whose keys are
  quantized but values not yet, the fp16 tails; a few tiles, dealt round-robin), in three
  straight loops (no data-dependent branch that yields tensors: Triton 3.6 miscompiled that
  form, see docs/kernels.md). They are launched after the lean programs, on a side stream, and take
  the SMs' slots as the lean programs free them.

The partial softmax results (log-sum-exp) are merged by the last program of each (batch row, KV head) to
finish (an arrival counter per pair), or, where a pair has more than ``MERGE_PARTS`` programs, by a merge
kernel after the launches. Each program holds all
``n_rep * q_len`` query rows of its KV head (padded to 8), so every KV tile is read once per GQA
group.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kvlab.kernels.reference import kv_heads, reference_attend

LOG2E = 1.4426950408889634


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's CPU interpreter multiplies bf16 tl.dot operands wrongly (triton 3.9); it gets fp32 ones.
# It has no inline assembly either: the interpreter unpacks codes with plain integer ops.
_INTERPRET = tl.constexpr(triton_interpreting())

# Bytes (4 per 32-bit register) -> fp16 bit fields, one AND per two codes, never shifted down: prmt
# spreads bytes b0..b3 into two registers holding (b0, b1) and (b2, b3) as 16-bit halves, and
# x & (mask << bits * j) is the bit pattern of the fp16 subnormal code * 2^(bits * j - 24), exactly.
# Tensor cores take fp16 subnormals exactly and accumulate in fp32 (the products, ~1e-9, are far from
# fp32's subnormals), so the kernel scales each logit, and each value accumulator once at the end, by
# 2^(24 - bits * j). Shifting each field down and converting it (shr, lop3 with 0x6400, sub.f16x2) took
# two thirds of the unpacking instructions.
def _field_asm(bits: int, j: int) -> str:
    field = ((1 << bits) - 1) << (bits * j)
    return ("{\n.reg .b32 a, b;\nprmt.b32 a, $2, 0, 0x4140;\nprmt.b32 b, $2, 0, 0x4342;\n"
            f"and.b32 $0, a, 0x{field:04x}{field:04x};\nand.b32 $1, b, 0x{field:04x}{field:04x};\n}}")


_F2_0, _F2_1, _F2_2, _F2_3 = (tl.constexpr(_field_asm(2, j)) for j in range(4))
_F4_0, _F4_1 = tl.constexpr(_field_asm(4, 0)), tl.constexpr(_field_asm(4, 1))


@triton.jit
def safe_dot(a, b):
    """tl.dot that is exact for fp32 operands (no TF32 on the GPU) and correct in the interpreter."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _field(x, J: tl.constexpr, BITS: tl.constexpr):
    """Bit field J of every byte of x, in place, as fp16 (code * 2^(BITS * J - 24)); one field at a time, so
    its registers live only until its use."""
    if _INTERPRET:  # no inline assembly there
        return (x.to(tl.int32) & (((1 << BITS) - 1) << (J * BITS))).to(tl.int16).to(tl.float16, bitcast=True)
    if BITS == 2:
        if J == 0:
            return tl.inline_asm_elementwise(_F2_0, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        if J == 1:
            return tl.inline_asm_elementwise(_F2_1, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        if J == 2:
            return tl.inline_asm_elementwise(_F2_2, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_F2_3, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    if J == 0:
        return tl.inline_asm_elementwise(_F4_0, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_F4_1, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _field_scale(J: tl.constexpr, BITS: tl.constexpr):
    """What turns a product with field J back into one with the codes."""
    return (1 << (24 - BITS * J)) * 1.0


# -- lean tiles -----------------------------------------------------------------------------

@triton.jit
def _exp2i(E: tl.constexpr):
    """2^E for an integer constexpr E of either sign."""
    if E >= 0:
        x = (1 << E) * 1.0
    else:
        x = 1.0 / (1 << -E)
    return x


@triton.jit
def _lean_logits(kbytes, hbytes, J: tl.constexpr, t0, qsT, zq, qbT, mask_rows, S, R4: tl.constexpr,
                 KPER: tl.constexpr, KBITS: tl.constexpr, NB: tl.constexpr, HAS_MASK: tl.constexpr):
    """Base-2 logits [R4, M] of key sub-tile J (tokens t0 + KPER * r + J) of a lean tile, tokens as rows."""
    s = safe_dot(_field(kbytes, J, KBITS), qsT)
    if NB > 0:
        s += safe_dot(_field(hbytes, J, KBITS), qbT)
    s = s * _field_scale(J, KBITS) + zq[None, :]
    if HAS_MASK:
        tok = t0 + KPER * tl.arange(0, R4) + J
        keep = tl.load(mask_rows[None, :] + (S + tok)[:, None]) != 0
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _lean_pv(p, J: tl.constexpr, t0, accT, vbT, vs_ptr, vz_ptr,
             D: tl.constexpr, R4: tl.constexpr, VPER: tl.constexpr, GV: tl.constexpr):
    """Adds the values of sub-tile J (tokens t0 + VPER * r + J: field J of the value bytes ``vbT [D, R4]``)
    times ``p [R4, M]`` (tokens as rows) to ``accT [D, M]``, values as the MMA's A operand (channels on M,
    tokens the reduction), and returns the value zero term per token and row.

    With GV == D the token's scale folds into p, times 2^(E_J) with E_J = (8 - bits) / 2 - bits * J, which
    turns field J (code * 2^(bits * J - 24)) into code * 2^((8 - bits) / 2 - 24) for every J: all fields
    share one accumulator, scaled once at the end. The factors (8, 2, 1/2, 1/8 at 2 bits; 4, 1/4 at 4)
    are centred on 1, so p * scale keeps clear of fp16's overflow and subnormals."""
    VBITS: tl.constexpr = 8 // VPER
    tok = t0 + VPER * tl.arange(0, R4) + J
    v = _field(vbT, J, VBITS)
    if GV == D:
        w = tl.load(vs_ptr + tok).to(tl.float32) * _exp2i((8 - VBITS) // 2 - VBITS * J)
        pz = p * tl.load(vz_ptr + tok).to(tl.float32)[:, None]
        pv = (p * w[:, None]).to(tl.float16)
    else:  # several value groups per token: dequantize (fp32 math, fp16 operand)
        pz = tl.zeros_like(p)
        pv = p.to(tl.float16)
        so = tok[None, :] * (D // GV) + (tl.arange(0, D) // GV)[:, None]
        codes = v.to(tl.float32) * _field_scale(J, VBITS)
        v = (codes * tl.load(vs_ptr + so).to(tl.float32) + tl.load(vz_ptr + so).to(tl.float32)).to(tl.float16)
    accT += safe_dot(v, pv)
    return pz, accT


# -- generic tiles (sinks, key/value boundary zone, tails) ----------------------------------

@triton.jit
def _unpacked_rows(byte, PER: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Codes ``[ROWS * PER, COLS]`` of bytes ``[ROWS, COLS]`` that hold PER consecutive rows each."""
    f = tl.arange(0, PER) * BITS
    codes = (byte.to(tl.int32)[:, None, :] >> f[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (ROWS * PER, COLS))


@triton.jit
def _gen_key_logits(qf, q_rows, row_ok, t0, lo_ptr, ks_ptr, kz_ptr, hi_ptr, idx_ptr,
                    BNG: tl.constexpr, D: tl.constexpr, G: tl.constexpr, KBITS: tl.constexpr, NB: tl.constexpr,
                    NB_PAD: tl.constexpr, HBITS: tl.constexpr, qk_scale):
    """Base-2 logits of the query rows against the quantized key tokens t0 .. t0 + BNG - 1 (one group)."""
    d = tl.arange(0, D)
    grp = t0 // G
    KPER: tl.constexpr = 8 // KBITS
    scale = tl.load(ks_ptr + grp * D + d).to(tl.float32)
    zero = tl.load(kz_ptr + grp * D + d).to(tl.float32)
    byte = tl.load(lo_ptr + (t0 // KPER + tl.arange(0, BNG // KPER))[:, None] * D + d[None, :])
    codes = _unpacked_rows(byte, KPER, KBITS, BNG // KPER, D)
    s = safe_dot((qf * scale[None, :]).to(tl.float16), tl.trans(codes.to(tl.float16)))
    s += tl.sum(qf * zero[None, :], axis=1)[:, None]
    if NB > 0:
        kb = tl.arange(0, NB_PAD)
        kb_ok = kb < NB
        ch = tl.load(idx_ptr + grp * NB + kb, mask=kb_ok, other=0).to(tl.int32)
        bscale = tl.load(ks_ptr + grp * D + ch, mask=kb_ok, other=0.0).to(tl.float32) * (1 << KBITS) * qk_scale
        qb = tl.load(q_rows[:, None] + ch[None, :], mask=row_ok[:, None] & kb_ok[None, :], other=0.0)
        qb = qb.to(tl.float32) * bscale[None, :]
        HPER: tl.constexpr = 8 // HBITS
        hb = tl.load(hi_ptr + (t0 // HPER + tl.arange(0, BNG // HPER))[:, None] * NB + kb[None, :],
                     mask=kb_ok[None, :], other=0)
        hcodes = _unpacked_rows(hb, HPER, HBITS, BNG // HPER, NB_PAD)
        s += safe_dot(qb.to(tl.float16), tl.trans(hcodes.to(tl.float16)))
    return s


@triton.jit
def _fp_key_logits(q, base, rows, ok, st, D: tl.constexpr, DTYPE: tl.constexpr, qk_scale):
    d = tl.arange(0, D)
    k = tl.load(base + rows[:, None] * st + d[None, :], mask=ok[:, None], other=0.0).to(DTYPE)
    return safe_dot(q, tl.trans(k)) * qk_scale


@triton.jit
def _gen_values(c0, t0, nq, QUANT: tl.constexpr, vc_ptr, vs_ptr, vz_ptr, fp_ptr, fp_rows, okf, fst,
                BNG: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, VBITS: tl.constexpr, GV: tl.constexpr):
    """Values ``[BNG, DC]`` of tokens t0 .. t0 + BNG - 1, channels c0 .. c0 + DC - 1: fp16 ones (rows fp_rows where
    okf) and, with QUANT, the packed ones below token nq (t0 and nq are multiples of the value block)."""
    c = c0 + tl.arange(0, DC)
    v = tl.load(fp_ptr + fp_rows[:, None] * fst + c[None, :], mask=okf[:, None], other=0.0)
    if QUANT:
        # byte rows t0 / VPER + r, four interleaved per channel (ValueTokenCodec)
        VPER: tl.constexpr = 8 // VBITS
        r = t0 // VPER + tl.arange(0, BNG // VPER)
        byte = tl.load(vc_ptr + ((r // 4) * (4 * D) + r % 4)[:, None] + 4 * c[None, :],
                       mask=(r * VPER < nq)[:, None], other=0)
        codes = _unpacked_rows(byte, VPER, VBITS, BNG // VPER, DC)
        t = t0 + tl.arange(0, BNG)
        okq = t < nq
        if GV == D:
            sc = tl.load(vs_ptr + t, mask=okq, other=0.0).to(tl.float32)[:, None]
            z = tl.load(vz_ptr + t, mask=okq, other=0.0).to(tl.float32)[:, None]
        else:
            so = t[:, None] * (D // GV) + (c // GV)[None, :]
            sc = tl.load(vs_ptr + so, mask=okq[:, None], other=0.0).to(tl.float32)
            z = tl.load(vz_ptr + so, mask=okq[:, None], other=0.0).to(tl.float32)
        v = tl.where(okq[:, None], codes.to(tl.float32) * sc + z, v.to(tl.float32))
    return v.to(tl.float16)


@triton.jit
def _padding_keep(keep, mask_rows, pos, HAS_MASK: tl.constexpr):
    """``keep`` narrowed by the keep-mask (left padding) at positions ``pos``, where there is one."""
    if HAS_MASK:
        keep &= tl.load(mask_rows[:, None] + pos[None, :], mask=keep, other=0) != 0
    return keep


@triton.jit
def _gen_step(s, keep, m_i, l_i, acc0, acc1, acc2, acc3, t0, nq, QUANT: tl.constexpr, vc_ptr, vs_ptr, vz_ptr,
              fp_ptr, fp_rows, okf, fst, BNG: tl.constexpr, D: tl.constexpr, NCH: tl.constexpr, VBITS: tl.constexpr,
              GV: tl.constexpr):
    """One online-softmax step; values in NCH chunks of consecutive channels, one accumulator each (a whole
    [tokens, D] value tile at once spills)."""
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p16 = p.to(tl.float16)
    DC: tl.constexpr = D // NCH
    acc0 = acc0 * alpha[:, None] + safe_dot(p16, _gen_values(0, t0, nq, QUANT, vc_ptr, vs_ptr, vz_ptr, fp_ptr, fp_rows,
                                                         okf, fst, BNG, D, DC, VBITS, GV))
    if NCH >= 2:
        acc1 = acc1 * alpha[:, None] + safe_dot(p16, _gen_values(DC, t0, nq, QUANT, vc_ptr, vs_ptr, vz_ptr, fp_ptr,
                                                             fp_rows, okf, fst, BNG, D, DC, VBITS, GV))
    if NCH >= 4:
        acc2 = acc2 * alpha[:, None] + safe_dot(p16, _gen_values(2 * DC, t0, nq, QUANT, vc_ptr, vs_ptr, vz_ptr, fp_ptr,
                                                             fp_rows, okf, fst, BNG, D, DC, VBITS, GV))
        acc3 = acc3 * alpha[:, None] + safe_dot(p16, _gen_values(3 * DC, t0, nq, QUANT, vc_ptr, vs_ptr, vz_ptr, fp_ptr,
                                                             fp_rows, okf, fst, BNG, D, DC, VBITS, GV))
    return m_new, l_i, acc0, acc1, acc2, acc3


# -- merging the partials -----------------------------------------------------------------------

@triton.jit
def _merge_rows(pm_ptr, pl_ptr, pacc_ptr, base, n_parts, rows, row_ok, dst, NR: tl.constexpr, D: tl.constexpr,
                RP: tl.constexpr, CH: tl.constexpr):
    """Merges the ``n_parts`` softmax partials (max, sum, unnormalised output; partial ``p`` of row ``r`` at
    ``base + p * NR + r``) of rows ``rows [RP]`` of one (batch, KV head), CH partials per load, and stores the
    normalised rows at ``dst[:, None] + d``. The loads bypass L1 (``.cg``): other programs wrote the partials."""
    d = tl.arange(0, D)
    p = tl.arange(0, CH)
    m_run = tl.full((RP,), float("-inf"), tl.float32)
    den = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    for c0 in range(0, n_parts, CH):
        at = base + (c0 + p)[:, None] * NR + rows[None, :]  # [CH, RP]
        ok = (c0 + p < n_parts)[:, None] & row_ok[None, :]
        m = tl.load(pm_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_p = tl.load(pl_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        x = tl.load(pacc_ptr + at[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible so far
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m - m_safe[None, :])
        den = den * alpha + tl.sum(w * l_p, axis=0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * x, axis=0)
        m_run = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]  # fully masked rows give 0
    tl.store(dst[:, None] + d[None, :], out.to(dst.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_if_last(ticket_ptr, n_parts, pm_ptr, pl_ptr, pacc_ptr, base, rows, row_ok, dst, NR: tl.constexpr,
                   D: tl.constexpr, RP: tl.constexpr, CH: tl.constexpr):
    """Called by each of a (batch, KV head)'s ``n_parts`` programs once its partial is stored: the last to arrive
    merges them all and sets the counter back to 0 for the next call. The barrier puts every thread's stores
    before the counter's release; the acquire puts the other programs' stores before the merge's loads."""
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == n_parts - 1:
        _merge_rows(pm_ptr, pl_ptr, pacc_ptr, base, n_parts, rows, row_ok, dst, NR, D, RP, CH)
        tl.atomic_xchg(ticket_ptr, 0)


_INT_ARGS = [
    "sq_b", "sq_h", "sq_t",
    "skb", "skh", "skt", "svb", "svh", "svt", "ktb", "kth", "ktt", "vtb", "vth", "vtt",
    "lo_b", "lo_h", "ks_b", "ks_h", "hi_b", "hi_h", "ix_b", "ix_h", "vc_b", "vc_h", "vs_b", "vs_h",
    "sm_b", "sm_q", "S", "Tk", "Tv", "Rk", "n_lean", "n_split", "TPS", "KR", "VR", "so_b", "so_t", "so_h",
]

# Columns of a static cache's per-step schedule (kvlab.static): sinks, quantized keys, quantized
# values, key tail length (new token included), and whether this step flushes a key block / a value block.
META_S, META_TK, META_TV, META_RK, META_KF, META_VF = range(6)
META_COLS = 8

# What one launch of _decode_kernel does: stream lean tiles, or the rest (sinks, boundary zone, tails).
ROLE_LEAN, ROLE_GENERIC = tl.constexpr(1), tl.constexpr(2)


@triton.jit(do_not_specialize=_INT_ARGS)
def _decode_kernel(
    q_ptr, sq_b, sq_h, sq_t,
    sk_ptr, sv_ptr, kt_ptr, vt_ptr,
    skb, skh, skt, svb, svh, svt, ktb, kth, ktt, vtb, vth, vtt,
    lo_ptr, ks_ptr, kz_ptr, hi_ptr, idx_ptr, vc_ptr, vs_ptr, vz_ptr,
    lo_b, lo_h, ks_b, ks_h, hi_b, hi_h, ix_b, ix_h, vc_b, vc_h, vs_b, vs_h,
    mask_ptr, sm_b, sm_q,
    pm_ptr, pl_ptr, pacc_ptr, out_ptr, so_b, so_t, so_h, ticket_ptr,
    S, Tk, Tv, Rk, n_lean, n_split, TPS, qk_scale,
    step_ptr, meta_ptr, KR, VR,
    HKV: tl.constexpr, N_REP: tl.constexpr, QLEN: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
    BN: tl.constexpr, BNG: tl.constexpr, G: tl.constexpr, KBITS: tl.constexpr, NB: tl.constexpr,
    NB_PAD: tl.constexpr, HBITS: tl.constexpr, VBITS: tl.constexpr, GV: tl.constexpr,
    LEAN: tl.constexpr, HAS_MASK: tl.constexpr, DTYPE: tl.constexpr, META: tl.constexpr, ROLE: tl.constexpr,
    N_GENERIC: tl.constexpr, MERGE_RP: tl.constexpr, MERGE_CH: tl.constexpr,
):
    """MERGE_CH > 0: the last program of each (batch, KV head) merges the partials (``_merge_if_last``), MERGE_CH
    of them per load, into ``out``; otherwise the merge kernel runs after the launches.

    META: lengths come from row ``*step_ptr`` of the schedule ``meta_ptr`` and the tails are rings
    (token ``t`` of the key tail in row ``t % KR``, of the value tail in ``t % VR``): a static cache
    whose launches a CUDA graph replays. Otherwise the tails start at rows 0 and lengths are arguments."""
    if META:
        meta_row = meta_ptr + tl.load(step_ptr) * 8
        S = tl.load(meta_row + 0)
        Tk = tl.load(meta_row + 1)
        Tv = tl.load(meta_row + 2)
        Rk = tl.load(meta_row + 3)
        if LEAN:
            n_lean = tl.minimum(Tk, Tv) // BN
    pid_s = tl.program_id(0)
    if ROLE == ROLE_GENERIC:
        pid_s += n_split
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # batch offsets of a long context overflow int32
    h = pid_bh % HKV
    n_parts = n_split + N_GENERIC
    L = S + Tk + Rk
    NR: tl.constexpr = N_REP * QLEN

    rows = tl.arange(0, M_PAD)  # row = r * QLEN + i: query head h * N_REP + r, query token i
    row_ok = rows < NR
    qi = rows % QLEN
    d = tl.arange(0, D)
    q_rows = q_ptr + b * sq_b + (h * N_REP + rows // QLEN) * sq_h + qi * sq_t
    q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    qf = q.to(tl.float32) * qk_scale
    q = q.to(DTYPE)

    # Every packed field is contiguous within a (batch, head) and its rows are whole bytes of D channels.
    lo_ptr += tl.multiple_of(b * lo_b + h * lo_h, D)
    ks_ptr += tl.multiple_of(b * ks_b + h * ks_h, D)
    kz_ptr += tl.multiple_of(b * ks_b + h * ks_h, D)
    hi_ptr += b * hi_b + h * hi_h
    idx_ptr += b * ix_b + h * ix_h
    vc_ptr += tl.multiple_of(b * vc_b + h * vc_h, D * VBITS // 8)
    vs_ptr += b * vs_b + h * vs_h
    vz_ptr += b * vs_b + h * vs_h
    # fp16 parts: rows start on 16 bytes (_fp_view), so that they load as vectors; the strides are rounded
    # here because a hint on an argument does not take
    sk_ptr += tl.multiple_of(b * skb + h * skh, 8)
    sv_ptr += tl.multiple_of(b * svb + h * svh, 8)
    kt_ptr += tl.multiple_of(b * ktb + h * kth, 8)
    vt_ptr += tl.multiple_of(b * vtb + h * vth, 8)
    skt, svt, ktt, vtt = skt // 8 * 8, svt // 8 * 8, ktt // 8 * 8, vtt // 8 * 8
    mask_rows = mask_ptr + b * sm_b + qi * sm_q

    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    # Partials of the real rows only: [B * HKV, n_parts, NR] m, l and [.., NR, D] acc.
    part = (pid_bh.to(tl.int64) * n_parts + pid_s) * NR

    # Lean program i streams lean tiles [i * TPS, (i + 1) * TPS); generic programs write parts n_split + gi.
    if ROLE == ROLE_LEAN:
        v0 = pid_s * TPS
        v1 = tl.minimum(v0 + TPS, n_lean)
        KPER: tl.constexpr = 8 // KBITS
        VPER: tl.constexpr = 8 // VBITS
        R4: tl.constexpr = BN // KPER
        r = tl.arange(0, R4)
        accT = tl.zeros((D, M_PAD), tl.float32)  # values are the A operand: channels on M, rows on N
        zacc = tl.zeros((M_PAD,), tl.float32)  # the value zero terms
        kb = tl.arange(0, NB_PAD)
        kb_ok = kb < NB
        for j in range(v0, v1):
            t0 = j * BN
            grp = t0 // G
            kscale = tl.load(ks_ptr + grp * D + d).to(tl.float32)
            kzero = tl.load(kz_ptr + grp * D + d).to(tl.float32)
            qsT = tl.trans((qf * kscale[None, :]).to(tl.float16))
            zq = tl.sum(qf * kzero[None, :], axis=1)
            kbytes = tl.load(lo_ptr + (t0 // KPER + r)[:, None] * D + d[None, :])  # [R4, D]
            # Value byte rows t0 / VPER + r, four interleaved per channel (ValueTokenCodec), are R4 / 4 whole rows
            # of 4 D contiguous bytes: loaded as such (16-byte copies; indexed as [D, R4] directly, Triton copied
            # them 4 bytes at a time), then [row, 4 c + s] -> vbT [c, 4 row + s]
            vrows = tl.load(vc_ptr + (t0 // (4 * VPER) + tl.arange(0, R4 // 4))[:, None] * (4 * D)
                            + tl.arange(0, 4 * D)[None, :])
            vbT = tl.reshape(tl.permute(tl.reshape(vrows, (R4 // 4, D, 4)), (1, 0, 2)), (D, R4))
            qbT = qsT  # placeholders when there is no boost
            hbytes = kbytes
            if NB > 0:
                ch = tl.load(idx_ptr + grp * NB + kb, mask=kb_ok, other=0).to(tl.int32)
                bscale = tl.load(ks_ptr + grp * D + ch, mask=kb_ok, other=0.0).to(tl.float32) * ((1 << KBITS) * qk_scale)
                qbf = tl.load(q_rows[None, :] + ch[:, None], mask=row_ok[None, :] & kb_ok[:, None], other=0.0)
                qbT = (qbf.to(tl.float32) * bscale[:, None]).to(tl.float16)  # [NB_PAD, M]
                hbytes = tl.load(hi_ptr + (t0 // KPER + r)[:, None] * NB + kb[None, :], mask=kb_ok[None, :], other=0)
            # One softmax update per tile: the KPER logit sub-tiles are independent products, and every
            # reduction over tokens (max, sum, value zero term) is taken once, on their elementwise combination.
            s0 = _lean_logits(kbytes, hbytes, 0, t0, qsT, zq, qbT, mask_rows, S, R4, KPER, KBITS, NB, HAS_MASK)
            s1 = _lean_logits(kbytes, hbytes, 1, t0, qsT, zq, qbT, mask_rows, S, R4, KPER, KBITS, NB, HAS_MASK)
            mx = tl.maximum(s0, s1)
            if KPER == 4:
                s2 = _lean_logits(kbytes, hbytes, 2, t0, qsT, zq, qbT, mask_rows, S, R4, KPER, KBITS, NB, HAS_MASK)
                s3 = _lean_logits(kbytes, hbytes, 3, t0, qsT, zq, qbT, mask_rows, S, R4, KPER, KBITS, NB, HAS_MASK)
                mx = tl.maximum(mx, tl.maximum(s2, s3))
            m_new = tl.maximum(m_i, tl.max(mx, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            m_i = m_new
            accT = accT * alpha[None, :]
            p0 = tl.exp2(s0 - m_safe[None, :])
            p1 = tl.exp2(s1 - m_safe[None, :])
            psum = p0 + p1
            z0, accT = _lean_pv(p0, 0, t0, accT, vbT, vs_ptr, vz_ptr, D, R4, VPER, GV)
            z1, accT = _lean_pv(p1, 1, t0, accT, vbT, vs_ptr, vz_ptr, D, R4, VPER, GV)
            zsum = z0 + z1
            if KPER == 4:
                p2 = tl.exp2(s2 - m_safe[None, :])
                p3 = tl.exp2(s3 - m_safe[None, :])
                psum += p2 + p3
                z2, accT = _lean_pv(p2, 2, t0, accT, vbT, vs_ptr, vz_ptr, D, R4, VPER, GV)
                z3, accT = _lean_pv(p3, 3, t0, accT, vbT, vs_ptr, vz_ptr, D, R4, VPER, GV)
                zsum += z2 + z3
            l_i = l_i * alpha + tl.sum(psum, axis=0)
            zacc = zacc * alpha + tl.sum(zsum, axis=0)
        if GV == D:  # p carried 2^(E_J) per field (_lean_pv)
            accT *= _exp2i(24 - (8 - VBITS) // 2)
        tl.store(pacc_ptr + (part + rows)[:, None] * D + d[None, :], tl.trans(accT) + zacc[:, None],
                 mask=row_ok[:, None])

    # Generic programs: straight loops over sink tiles, boundary tiles (quantized keys, values
    # quantized or not) and tail tiles.
    if ROLE == ROLE_GENERIC:
        # The zones' tiles are numbered one after the other and dealt round-robin: generic program gi takes
        # tiles gi, gi + N_GENERIC, ..., so no program takes two while another one idles.
        gi = pid_s - n_split
        n_sink_tiles = tl.cdiv(S, BNG)
        t_start = n_lean * BN
        n_bound_tiles = (Tk - t_start) // BNG
        first_bound = (gi - n_sink_tiles % N_GENERIC + N_GENERIC) % N_GENERIC
        first_tail = (gi - (n_sink_tiles + n_bound_tiles) % N_GENERIC + N_GENERIC) % N_GENERIC
        offs = tl.arange(0, BNG)
        causal_end = (L - QLEN + qi)[:, None]
        NCH: tl.constexpr = 4 if D >= 64 else D // 16
        acc0 = tl.zeros((M_PAD, D // NCH), tl.float32)
        acc1 = tl.zeros((M_PAD, D // NCH), tl.float32)
        acc2 = tl.zeros((M_PAD, D // NCH), tl.float32)
        acc3 = tl.zeros((M_PAD, D // NCH), tl.float32)
        for g in range(gi, n_sink_tiles, N_GENERIC):
            pos = g * BNG + offs
            ok = pos < S
            s = _fp_key_logits(q, sk_ptr, pos, ok, skt, D, DTYPE, qk_scale)
            keep = row_ok[:, None] & ok[None, :] & (pos[None, :] <= causal_end)
            keep = _padding_keep(keep, mask_rows, pos, HAS_MASK)
            m_i, l_i, acc0, acc1, acc2, acc3 = _gen_step(
                s, keep, m_i, l_i, acc0, acc1, acc2, acc3, 0, 0, False, vc_ptr, vs_ptr, vz_ptr,
                sv_ptr, pos, ok, svt, BNG, D, NCH, VBITS, GV)
        for g in range(first_bound, n_bound_tiles, N_GENERIC):
            t = t_start + g * BNG + offs
            pos = S + t
            s = _gen_key_logits(qf, q_rows, row_ok, t_start + g * BNG, lo_ptr, ks_ptr, kz_ptr, hi_ptr, idx_ptr,
                                BNG, D, G, KBITS, NB, NB_PAD, HBITS, qk_scale)
            keep = row_ok[:, None] & (pos[None, :] <= causal_end)
            keep = _padding_keep(keep, mask_rows, pos, HAS_MASK)
            vrow = t - Tv
            if META:
                vrow = t % VR
            m_i, l_i, acc0, acc1, acc2, acc3 = _gen_step(
                s, keep, m_i, l_i, acc0, acc1, acc2, acc3, t_start + g * BNG, Tv, True, vc_ptr, vs_ptr, vz_ptr,
                vt_ptr, vrow, t >= Tv, vtt, BNG, D, NCH, VBITS, GV)
        for g in range(first_tail, tl.cdiv(Rk, BNG), N_GENERIC):
            t = Tk + g * BNG + offs  # keys and values both from the tails here (Tk >= Tv)
            pos = S + t
            ok = pos < L
            krow = t - Tk
            vrow = t - Tv
            if META:
                krow = t % KR
                vrow = t % VR
            s = _fp_key_logits(q, kt_ptr, krow, ok, ktt, D, DTYPE, qk_scale)
            keep = row_ok[:, None] & ok[None, :] & (pos[None, :] <= causal_end)
            keep = _padding_keep(keep, mask_rows, pos, HAS_MASK)
            m_i, l_i, acc0, acc1, acc2, acc3 = _gen_step(
                s, keep, m_i, l_i, acc0, acc1, acc2, acc3, 0, 0, False, vc_ptr, vs_ptr, vz_ptr,
                vt_ptr, vrow, ok, vtt, BNG, D, NCH, VBITS, GV)

        dst = pacc_ptr + (part + rows)[:, None] * D + tl.arange(0, D // NCH)[None, :]
        tl.store(dst, acc0, mask=row_ok[:, None])
        if NCH >= 2:
            tl.store(dst + D // NCH, acc1, mask=row_ok[:, None])
        if NCH >= 4:
            tl.store(dst + 2 * D // NCH, acc2, mask=row_ok[:, None])
            tl.store(dst + 3 * D // NCH, acc3, mask=row_ok[:, None])
    tl.store(pm_ptr + part + rows, m_i, mask=row_ok)
    tl.store(pl_ptr + part + rows, l_i, mask=row_ok)
    if MERGE_CH > 0:
        mrows = tl.arange(0, MERGE_RP)
        dst = out_ptr + b * so_b + (mrows % QLEN) * so_t + (h * N_REP + mrows // QLEN) * so_h
        _merge_if_last(ticket_ptr + pid_bh, n_parts, pm_ptr, pl_ptr, pacc_ptr, pid_bh.to(tl.int64) * n_parts * NR,
                       mrows, mrows < NR, dst, NR, D, MERGE_RP, MERGE_CH)


@triton.jit(do_not_specialize=["n_parts", "so_b", "so_t", "so_h"])
def _combine_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, n_parts, so_b, so_t, so_h,
                    HKV: tl.constexpr, N_REP: tl.constexpr, QLEN: tl.constexpr, D: tl.constexpr, CH: tl.constexpr):
    NR: tl.constexpr = N_REP * QLEN
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) + tl.arange(0, 1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    dst = out_ptr + b * so_b + (rows % QLEN) * so_t + (h * N_REP + rows // QLEN) * so_h
    _merge_rows(pm_ptr, pl_ptr, pacc_ptr, pid_bh.to(tl.int64) * n_parts * NR, n_parts, rows, rows < NR, dst, NR, D,
                1, CH)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_DUMMIES: dict = {}
_TICKETS: dict = {}


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _sm_count(_cuda_index(device)) if device.type == "cuda" else 4


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    """One stream per GPU for the generic launch, beside the caller's stream."""
    return torch.cuda.Stream(index)


def _dummy(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(16, dtype=dtype, device=device)
    return _DUMMIES[key]


def _tickets(device: torch.device, pairs: int) -> torch.Tensor:
    """Arrival counters, one per (batch, KV head), for the merge by the last program: 0 between calls (the
    merging program sets its own back). One buffer per device and stream, grown but never freed, since a
    captured CUDA graph keeps the address it was recorded with."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    held = _TICKETS.setdefault((device, stream), [])
    if not held or held[-1].numel() < pairs:
        held.append(torch.zeros(max(pairs, 4096), dtype=torch.int32, device=device))
    return held[-1]


def merge_chunk(n_parts: int, rows: int, D: int, warps: int) -> int:
    """Partials per load when the last program of a (batch, KV head) merges them itself (MERGE_LOAD_REGS
    registers per thread for the load), or 0 where a pair has more than MERGE_PARTS partials: a long chain of
    loads on one program, so the merge kernel runs after the launch instead."""
    if n_parts > MERGE_PARTS:
        return 0
    return max(1, min(_pow2(n_parts), MERGE_LOAD_REGS * 32 * warps // (rows * D)))


def _tile_tokens(group_size: int, limit: int) -> int:
    """Largest power of two <= limit dividing the key group (a key tile must lie in one group)."""
    bn = limit
    while bn > 16 and group_size % bn:
        bn //= 2
    return bn if group_size % bn == 0 else 0


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """A packed field as the kernel reads it: rows of contiguous bytes per (batch, head); a view of
    a preallocated buffer ([:, :, :n]) already is one (no copy), other layouts are made contiguous."""
    ok = t.stride(-1) == 1 and (t.dim() < 4 or t.stride(2) == t.shape[3])
    return t if ok else t.contiguous()


def _fp_view(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """An fp16 part of the layer (or an empty stand-in) and its strides."""
    if t is None or t.shape[2] == 0:
        return like, 0, 0, 0
    if t.stride(3) != 1 or any(st % 8 for st in t.stride()[:3]) or t.data_ptr() % 16:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


def lean_config(kc, vc) -> tuple[bool, int]:
    """Whether quantized tiles take the lean path, and its tile size BN."""
    apply_tuning_overrides()
    bn = _tile_tokens(kc.group_size, LEAN_TILE)
    ok = (kc.bits in (2, 4) and vc.bits == kc.bits and bn and bn // (8 // kc.bits) >= 16
          and (not kc.boost_channels or kc.boost_bits - kc.bits == kc.bits))
    return bool(ok), bn


def lean_occupancy(kc) -> tuple[int, int]:
    """(register cap, 0 for none; programs per SM the splits are planned for) of the lean launch."""
    cap, per_sm = (168, 12) if kc.boost_channels else (160, 12) if kc.bits == 2 else (0, 16)
    return (cap if LEAN_MAXNREG < 0 else LEAN_MAXNREG), (LEAN_PER_SM or per_sm)


def kernel_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int, key_codec=None,
                       value_codec=None) -> str | None:
    """Why the decode kernels cannot serve a layer of these shapes (and codecs, if given), or None."""
    apply_tuning_overrides()
    D = head_dim
    if device.type != "cuda" and not triton_interpreting():
        return "not on a CUDA device"
    if dtype not in _TL_DTYPE:
        return f"dtype {dtype}"
    if D < 16 or D & (D - 1):
        return f"head_dim {D} is not a power of two >= 16"
    tile = _tile_tokens(key_codec.group_size, GENERIC_TILE) if key_codec is not None else None
    if tile == 0:
        return f"key group {key_codec.group_size} is not a multiple of 16"
    if value_codec is not None and (value_codec.group_size & (value_codec.group_size - 1) or D % value_codec.group_size):
        return f"value group {value_codec.group_size} is not a power of two dividing head_dim"
    if tile and value_codec is not None and value_codec.block_tokens > tile:
        return f"value blocks of {value_codec.block_tokens} tokens are longer than a key tile"
    return None


def unsupported_reason(layer, query: torch.Tensor, attention_mask: torch.Tensor | None) -> str | None:
    """Why ``fused_attend`` would fall back to the reference for this call, or None."""
    reason = kernel_unsupported(query.device, query.dtype, query.shape[-1], layer.key_codec, layer.value_codec)
    if reason is None and attention_mask is not None and attention_mask.dtype != torch.bool:
        return "non-boolean attention mask"
    return reason


def _tuning(name: str, default: int, minimum: int = 0) -> int:
    value = os.environ.get(name, "")
    try:
        number = int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: kvlab's kernel tuning overrides take an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={number}: takes an integer >= {minimum}")
    return number


def _tile_tuning(name: str, default: int) -> int:
    """A tile-size override: a power of two >= 16 tokens (an MMA's K or M side)."""
    value = _tuning(name, default)
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value}: a tile takes a power of two >= 16 tokens")
    return value


# Launch shapes (measured on an H100 and an H200, docs/kernels.md; each overridable by environment variable):
# * lean programs get one warp: every softmax reduction stays inside the warp (with 4 warps, 49 barriers and
#   shared-memory round trips per tile; H100 8x32K kivi-2: 162 us vs 282). Tiles of 64 tokens (128 were faster
#   for long 2-bit contexts with values as the B operand; with values as the A operand, H200 kivi-2 8x32K:
#   90.5 us with 64 vs 95.9 with 128). Registers (ptxas, offline: kivi-2 190, kivi-4 206, kitty-pro 168 uncapped,
#   no spills): kivi-2 capped at 160 with 12 programs per SM planned (H200 8x32K 90.5 vs 98.2 us uncapped,
#   16x4K 45.1 vs 47.3), kitty-pro at 168 with 12 per SM (8x32K 111.6 vs 128.4 at 18 per SM), kivi-4 uncapped
#   with 16 per SM (8x32K 129.3 vs 166.0 capped at 168);
# * the generic part runs as a second launch of 4-warp programs, tiles of GENERIC_TILE tokens dealt round-robin:
#   N_GENERIC programs per (batch, KV head), fewer where that would make more than GENERIC_PER_SM per SM, i.e.
#   one wave (each program costs about a tile chain's latency however few tiles it holds; H200 kivi-2 at 4 / 8 /
#   no limit per SM: 16x4K 34.1 / 36.6 / 36.5 us, 64x4K 91.8 / 94.5 / 113.5, 32x8K 80.9 / 85.4 / 90.7; N_GENERIC 4
#   rather than 8 where pairs are few: 8x32K kivi-4 114.7 vs 133.4 us, kivi-2 76.1 vs 77.3, 1x8K kivi-2 10.8 vs
#   11.5, 1x128K 45.4 vs 46.8; 2 was within 1.7 us of 4 either way); registers
#   capped at 128, 4 programs per SM (ptxas, offline: kivi-2 128 uncapped, kitty-pro 168, no spills at 128;
#   capped at 168: 64x4K 99.4 us); 32-token tiles rather than 64 (H200 16x4K: kivi-2 37.6 vs 38.9 us, kitty-pro
#   44.7 vs 53.1); 4 warps, 3 stages (the call at 16x4K / 8x32K / 64x4K, kivi-2: 34.0 / 75.9 / 86.8 us; 2 stages
#   33.5 / 77.5 / 87.4, 1 stage 34.6 / 79.1 / 95.1; the launch alone with 2 / 8 warps 11.8 / 17.6 vs 10.8 at 16x4K);
# * the last program of a (batch, KV head) merges the partials where there are at most MERGE_PARTS of them (H200
#   kivi-2, merge kernel vs last program: 64x4K, 4 partials, 92.5 vs 86.9 us; 32x8K, 8: 81.3 vs 78.6; but 16x4K,
#   15: 34.1 vs 35.1; 8x32K, 32: 77.4 vs 79.8; 1x128K, 206: 46.9 vs 68.1: one warp's chain of loads).
LEAN_TILE = 64
LEAN_WARPS = 1
LEAN_MAXNREG = -1  # -1: by the rule above, 0: no cap
LEAN_PER_SM = 0  # 0: by the rule above
LEAN_STAGES = 3  # tiles in flight (Triton's software pipelining)
LEAN_MIN_TILES = 4  # tiles per lean program at least (few pairs: more programs, more partials to merge)
N_GENERIC = 4
GENERIC_WARPS = 4
GENERIC_STAGES = 3
GENERIC_PER_SM = 4
GENERIC_TILE = 32  # tokens per generic tile (at most; within one key group)
MAXNREG = 128
CONCURRENT_GENERIC = 1  # generic launch on a side stream, beside the lean one
MERGE_PARTS = 8  # at most this many partials per pair: merged by the last program
MERGE_LOAD_REGS = 64

# Each launch shape above may be overridden by an environment variable: name -> (variable, smallest value; None
# for a tile size). They are read at the first launch, not at import, so that a malformed one is reported where
# the caller handles errors (the command line checks them before it starts: a one-line error).
_OVERRIDES = {
    "LEAN_TILE": ("KVLAB_LEAN_TILE", None), "LEAN_WARPS": ("KVLAB_LEAN_WARPS", 1),
    "LEAN_MAXNREG": ("KVLAB_LEAN_MAXNREG", -1), "LEAN_PER_SM": ("KVLAB_LEAN_PER_SM", 0),
    "LEAN_STAGES": ("KVLAB_LEAN_STAGES", 1), "LEAN_MIN_TILES": ("KVLAB_LEAN_MIN_TILES", 1),
    "N_GENERIC": ("KVLAB_GENERIC_PROGRAMS", 1),
    "GENERIC_WARPS": ("KVLAB_GENERIC_WARPS", 1), "GENERIC_STAGES": ("KVLAB_GENERIC_STAGES", 1),
    "GENERIC_PER_SM": ("KVLAB_GENERIC_PER_SM", 1), "GENERIC_TILE": ("KVLAB_GENERIC_TILE", None),
    "MAXNREG": ("KVLAB_MAXNREG", 0), "CONCURRENT_GENERIC": ("KVLAB_CONCURRENT_GENERIC", 0),
    "MERGE_PARTS": ("KVLAB_MERGE_PARTS", 0),
}
_overrides_applied = False


def tuning_overrides() -> dict[str, int]:
    """The launch-shape overrides set in the environment (``KVLAB_LEAN_TILE=128``, ...), by constant name.
    Raises ValueError naming the variable where one is malformed."""
    found = {}
    for name, (variable, minimum) in _OVERRIDES.items():
        if os.environ.get(variable, ""):
            default = globals()[name]
            found[name] = _tile_tuning(variable, default) if minimum is None else _tuning(variable, default, minimum)
    return found


def apply_tuning_overrides() -> None:
    """Sets the launch shapes above from the environment, once (the kernels call it before their first launch)."""
    global _overrides_applied
    if not _overrides_applied:
        globals().update(tuning_overrides())
        _overrides_applied = True


def _reg_cap(cap: int) -> dict:
    return {} if triton_interpreting() or not cap else {"maxnreg": cap}


def generic_programs(bh: int, sms: int) -> int:
    """Generic programs per (batch, KV head): N_GENERIC, fewer where that would make more than GENERIC_PER_SM per SM."""
    return max(1, min(N_GENERIC, GENERIC_PER_SM * sms // bh))


def plan_splits(n_lean: int, bh: int, sms: int, per_sm: int) -> tuple[int, int]:
    """(lean tiles per program, lean programs per (batch, KV head)): at most ``per_sm`` programs per SM,
    >= LEAN_MIN_TILES tiles each."""
    if n_lean == 0:
        return 1, 0
    want = max(1, per_sm * sms // bh)
    tps = max(min(LEAN_MIN_TILES, n_lean), -(-n_lean // want))
    return tps, -(-n_lean // tps)


def fused_attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None,
                 scaling: float | None = None) -> torch.Tensor:
    """Decode attention of ``query [B, Hq, q_len, D]`` over a QuantizedLayer -> ``[B, q_len, Hq, D]``.

    Reads the layer's packed fields directly; falls back to :func:`reference_attend` (dequantize +
    SDPA) where the kernel does not apply (CPU, many query rows as in prefill, odd group sizes,
    non-boolean masks).
    """
    B, HQ, QLEN, _ = query.shape
    reason = unsupported_reason(layer, query, attention_mask)
    HKV = kv_heads(layer)
    if reason is None and HQ // HKV * QLEN > 64:
        reason = "too many query rows"
    S = 0 if layer.sink_keys is None else layer.sink_keys.shape[2]
    Tk, Tv = layer.key_store.tokens, layer.value_store.tokens
    L = S + Tk + (0 if layer.key_tail is None else layer.key_tail.shape[2])
    if reason is None and attention_mask is not None and attention_mask.shape[-1] < L:
        reason = "mask shorter than the cache"
    if reason is not None:
        return reference_attend(layer, query, attention_mask, scaling)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., -QLEN:, :L].expand(B, 1, QLEN, L)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    return _launch(layer, query, scaling, HKV, (S, Tk, Tv, L - S - Tk),
                   (layer.sink_keys, layer.sink_values, layer.key_tail, layer.value_tail),
                   layer.key_store.fields if Tk else None, layer.value_store.fields if Tv else None, mask)


def static_attend(layer, query: torch.Tensor, valid: torch.Tensor | None, scaling: float | None,
                  step: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Decode attention over a static layer (:mod:`kvlab.static`): every length is read on the
    device from ``meta[step]``, the tails are rings and the packed fields full preallocated
    buffers, so a CUDA graph can replay the launch at every step. ``valid [B, capacity]`` bool
    marks the positions that may be attended (left padding is False)."""
    keys, values = layer.key_store, layer.value_store
    HKV = layer.key_ring.shape[1]
    mask = None if valid is None else valid[:, None, None, :]
    return _launch(layer, query, scaling, HKV, None,
                   (layer.sink_keys, layer.sink_values, layer.key_ring, layer.value_ring),
                   keys.buffers(), values.buffers(), mask,
                   static=(step, meta, layer.key_ring.shape[2], layer.value_ring.shape[2], keys.capacity))


def _launch(layer, query: torch.Tensor, scaling: float | None, HKV: int, lengths: tuple[int, int, int, int] | None,
            fp_parts: tuple, fields_k, fields_v, mask: torch.Tensor | None, static: tuple | None = None) -> torch.Tensor:
    B, HQ, QLEN, D = query.shape
    kc, vc = layer.key_codec, layer.value_codec
    n_rep = HQ // HKV
    dtype, dev = query.dtype, query.device
    sk, skb, skh, skt = _fp_view(fp_parts[0], query)
    sv, svb, svh, svt = _fp_view(fp_parts[1], query)
    kt, ktb, kth, ktt = _fp_view(fp_parts[2], query)
    vt, vtb, vth, vtt = _fp_view(fp_parts[3], query)
    d8, d16 = _dummy(torch.uint8, dev), _dummy(torch.float16, dev)
    NB = kc.boost_channels if fields_k else 0
    lo, ks, kz = (_rows_view(fields_k[n]) for n in ("lo", "scale", "zero")) if fields_k else (d8, d16, d16)
    hi, idx = (_rows_view(fields_k["hi"]), _rows_view(fields_k["idx"])) if NB else (d8, _dummy(torch.int16, dev))
    vcodes, vs, vz = (_rows_view(fields_v[n]) for n in ("codes", "scale", "zero")) if fields_v else (d8, d16, d16)

    def bh(t: torch.Tensor) -> tuple[int, int]:
        return (t.stride(0), t.stride(1)) if t.dim() == 4 else (0, 0)

    if mask is not None:
        mask_u8, sm_b, sm_q = mask.view(torch.uint8), mask.stride(0), mask.stride(2)
    else:
        mask_u8, sm_b, sm_q = d8, 0, 0

    lean, BN = lean_config(kc, vc)
    if static is None:
        S, Tk, Tv, Rk = lengths
        n_lean = min(Tk, Tv) // BN if lean else 0
        step, meta, KR, VR = d8, d8, 0, 0
        planned = n_lean
    else:
        S = Tk = Tv = Rk = n_lean = 0
        step, meta, KR, VR, capacity = static
        planned = capacity // BN if lean else 0
    lean_cap, per_sm = lean_occupancy(kc)
    sms = _num_sms(dev)
    tps, n_split = plan_splits(planned, B * HKV, sms, per_sm)
    n_generic = generic_programs(B * HKV, sms)
    n_parts = n_split + n_generic  # + the generic programs (sinks, boundary zone, tails)
    NR = n_rep * QLEN
    pm, pl, pacc, tickets = partials(B * HKV, n_parts, NR, D, dev)
    out = torch.empty(B, QLEN, HQ, D, dtype=dtype, device=dev)
    merge_rp = _pow2(NR)
    scale = (scaling if scaling is not None else 1.0 / math.sqrt(D)) * LOG2E
    q = query if query.stride(3) == 1 else query.contiguous()

    args = (
        q, q.stride(0), q.stride(1), q.stride(2),
        sk, sv, kt, vt, skb, skh, skt, svb, svh, svt, ktb, kth, ktt, vtb, vth, vtt,
        lo, ks, kz, hi, idx, vcodes, vs, vz,
        *bh(lo), *bh(ks), *bh(hi), *bh(idx), *bh(vcodes), *bh(vs),
        mask_u8, sm_b, sm_q,
        pm, pl, pacc, out, out.stride(0), out.stride(1), out.stride(2), tickets,
        S, Tk, Tv, Rk, n_lean, n_split, tps, scale,
        step, meta, KR, VR,
    )
    consts = dict(
        HKV=HKV, N_REP=n_rep, QLEN=QLEN, M_PAD=max(8, _pow2(NR)), D=D, BN=BN,
        BNG=_tile_tokens(kc.group_size, GENERIC_TILE), G=kc.group_size, KBITS=kc.bits, NB=NB,
        NB_PAD=max(16, _pow2(NB)), HBITS=max(1, kc.boost_bits - kc.bits),
        VBITS=vc.bits, GV=vc.group_size, LEAN=lean, HAS_MASK=mask is not None, DTYPE=_TL_DTYPE[dtype],
        META=static is not None, N_GENERIC=n_generic, MERGE_RP=merge_rp,
    )
    # The generic programs are few and latency-bound: on a side stream (a parallel branch of a captured CUDA
    # graph) they run beside the lean ones. The lean launch goes first: where its programs fill the SMs, the
    # generic ones take the slots they free, instead of every SM's registers while the lean programs wait (H100,
    # docs/kernels.md, thirteenth session: 16 x 4K step kivi-2 -2.1%, kitty-pro -0.7%; 8 x 32K kernel -5% / -3%;
    # 1 x 4K step +1.3% / -1.5%).
    side = _side_stream(_cuda_index(dev)) if n_split and CONCURRENT_GENERIC and dev.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    if n_split:
        _decode_kernel[(n_split, B * HKV)](*args, **consts, ROLE=ROLE_LEAN.value, num_warps=LEAN_WARPS,
                                           num_stages=LEAN_STAGES, **_reg_cap(lean_cap),
                                           MERGE_CH=merge_chunk(n_parts, merge_rp, D, LEAN_WARPS))
    with torch.cuda.stream(side):
        _decode_kernel[(n_generic, B * HKV)](
            *args, **consts, ROLE=ROLE_GENERIC.value, num_warps=GENERIC_WARPS, num_stages=GENERIC_STAGES,
            MERGE_CH=merge_chunk(n_parts, merge_rp, D, GENERIC_WARPS), **_reg_cap(MAXNREG))
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
    if n_parts > MERGE_PARTS:
        combine(pm, pl, pacc, out, HKV, n_rep, n_parts)
    return out


def partials(pairs: int, n_parts: int, rows: int, D: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Storage for the programs' softmax partials: max and sum ``[pairs * n_parts * rows]``, unnormalised
    output ``[.., D]``, fp32; and the pairs' arrival counters where the last program merges (at most
    MERGE_PARTS partials; else a stand-in, and the caller runs :func:`combine`)."""
    pm = torch.empty(pairs * n_parts * rows, dtype=torch.float32, device=device)
    pacc = torch.empty(pairs * n_parts * rows, D, dtype=torch.float32, device=device)
    tickets = _tickets(device, pairs) if n_parts <= MERGE_PARTS else _dummy(torch.int32, device)
    return pm, torch.empty_like(pm), pacc, tickets


def combine(pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor, out: torch.Tensor, HKV: int, n_rep: int,
            n_parts: int) -> None:
    """Merges per-program softmax partials (max, sum, unnormalised output) into ``out [B, q_len, Hq, D]``."""
    B, QLEN, _, D = out.shape
    _combine_kernel[(B * HKV, n_rep * QLEN)](
        pm, pl, pacc, out, n_parts, out.stride(0), out.stride(1), out.stride(2),
        HKV=HKV, N_REP=n_rep, QLEN=QLEN, D=D, CH=min(32, _pow2(n_parts)), num_warps=4,
    )
