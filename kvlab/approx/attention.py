"""Attention with AxCore's fp16 x fp16 approximate multiply (the AxCore-KV datapath), emulated.

Both matrix products use :func:`fp16_approx_mul` (+C) on fp16 operands; softmax is exact.
Accumulation order (ours: the artifact's attention kernel is not public), mirroring the AxCore
GEMM's groups of ``G`` (64) along the contraction dimension:

* ``S[q, t] = sum_g fp32  fp16sum_{d in g} approx(Q[q, d], K[t, d])`` over groups of ``G`` head
  channels, the fp16 sum sequential (one rounding per add), groups added in order in fp32;
* ``P = softmax(S * scaling + mask)`` in fp32, rounded to fp16;
* ``O[q, d] = fp16( sum_g fp32  fp16sum_{t in g} approx(P[q, t], V[t, d]) )`` over groups of
  ``G`` tokens counted from the first cached token (a trailing partial group is a group).

The result does not depend on how the work is chunked: queries and keys are processed in
chunks (keys in whole groups) of at most ``budget`` products, so nothing of size
``B x H x Q x T x D`` is built, and key chunks that causality hides from a whole query chunk
are skipped (their products would all be ``+0``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.kernels.reference import keep_mask

from .mul import COMPENSATION, FP16_ONE, INF_BITS, fp16_approx_mul

GROUP = 64
BUDGET = 1 << 23  # products materialised at once
QUERY_CHUNK = 128
_ZERO_MAG = -(1 << 16)  # a zero operand's magnitude: every sum with it clamps to 0

Mul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fast_mul(comp: int) -> Mul:
    """``fp16_approx_mul`` for finite operands, with fewer full-size passes (in place).

    Equal in value to it (a zero operand may give ``-0`` where it gives ``+0``).
    """

    def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ab = a.contiguous().view(torch.int16).to(torch.int32)
        bb = b.contiguous().view(torch.int16).to(torch.int32)
        ma, mb = ab & 0x7FFF, bb & 0x7FFF
        ma = torch.where(ma == 0, _ZERO_MAG, ma + (comp - FP16_ONE))
        mb = torch.where(mb == 0, _ZERO_MAG, mb)
        r = (ma + mb).clamp_(0, INF_BITS)
        r += ab & 0x8000  # sign bits add in bit 15; a carry into bit 16 (two signs) is dropped
        r += bb & 0x8000  # below, so bit 15 ends up as their XOR
        return r.to(torch.int16).view(torch.float16)  # int32 -> int16 keeps the low 16 bits

    return mul


def _grouped_sum(prods: torch.Tensor, out32: torch.Tensor | None) -> torch.Tensor:
    """``prods [g, ..., n_groups, X]``: sequential fp16 sum over dim 0, then each group's sum
    added in order into the fp32 ``out32 [..., X]``."""
    acc = prods[0].clone()
    for j in range(1, prods.shape[0]):
        acc += prods[j]
    for gi in range(acc.shape[-2]):
        part = acc[..., gi, :].float()
        out32 = part if out32 is None else out32.add_(part)
    return out32


def _scores(q: torch.Tensor, k: torch.Tensor, mul: Mul, group: int) -> torch.Tensor:
    """fp32 ``[B, Hkv, r, qc, kc]`` for ``q [B, Hkv, r, qc, D]``, ``k [B, Hkv, kc, D]``."""
    B, H, r, qc, D = q.shape
    kc = k.shape[2]
    ng = -(-D // group)
    pad = ng * group - D
    qg = torch.nn.functional.pad(q, (0, pad)).view(B, H, r, qc, ng, group)
    kg = torch.nn.functional.pad(k, (0, pad)).view(B, H, kc, ng, group)
    # [group, B, H, r, qc, ng, kc]: products of one group channel at a time along dim 0
    a = qg.permute(5, 0, 1, 2, 3, 4).unsqueeze(-1)
    b = kg.permute(4, 0, 1, 3, 2)[:, :, :, None, None]
    return _grouped_sum(mul(a, b), None)


def _weighted(p: torch.Tensor, v: torch.Tensor, mul: Mul, group: int, out32: torch.Tensor | None):
    """Adds ``P [B, Hkv, r, qc, kc] @ V [B, Hkv, kc, D]`` (kc a multiple of ``group`` or the
    last chunk) to the fp32 ``out32 [B, Hkv, r, qc, D]``, group by group."""
    B, H, r, qc, kc = p.shape
    ng = -(-kc // group)
    pad = ng * group - kc
    pg = torch.nn.functional.pad(p, (0, pad)).view(B, H, r, qc, ng, group)
    vg = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, H, ng, group, -1)
    a = pg.permute(5, 0, 1, 2, 3, 4).unsqueeze(-1)  # [group, B, H, r, qc, ng, 1]
    b = vg.permute(3, 0, 1, 2, 4)[:, :, :, None, None]  # [group, B, H, 1, 1, ng, D]
    return _grouped_sum(mul(a, b), out32)


def approx_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    comp: int = COMPENSATION["fp16"],
    group: int = GROUP,
    budget: int = BUDGET,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Q, D]`` over ``key``/``value [B, Hkv, T, D]`` with approximate
    products -> ``[B, Q, Hq, D]`` in the query's dtype (transformers' attention-function layout).

    Causal bottom-right (the last ``Q`` keys are the queries' own) and'ed with ``attention_mask``.
    """
    B, Hq, Q, D = query.shape
    H, T = key.shape[1], key.shape[2]
    r = Hq // H
    scale = scaling if scaling is not None else D**-0.5
    q16 = query.to(torch.float16).reshape(B, H, r, Q, D)
    k16, v16 = key.to(torch.float16), value.to(torch.float16)
    finite = bool(q16.isfinite().all() and k16.isfinite().all() and v16.isfinite().all())
    mul: Mul = fast_mul(comp) if finite else (lambda a, b: fp16_approx_mul(a, b, comp))
    keep = keep_mask(attention_mask, Q, T, query.device).unsqueeze(2)  # [B|1, 1, 1, Q, T]
    qc = max(1, min(Q, QUERY_CHUNK, budget // (B * Hq * group * D)))
    kc = max(group, budget // (B * Hq * qc * D) // group * group)
    out = torch.empty(B, H, r, Q, D, dtype=torch.float16, device=query.device)
    for q0 in range(0, Q, qc):
        q1 = min(Q, q0 + qc)
        visible = T - Q + q1  # keys beyond this are hidden from every row of the chunk
        chunks = [(k0, min(visible, k0 + kc)) for k0 in range(0, visible, kc)]
        s = torch.full((B, H, r, q1 - q0, T), float("-inf"), device=query.device)
        for k0, k1 in chunks:
            s[..., k0:k1] = _scores(q16[:, :, :, q0:q1], k16[:, :, k0:k1], mul, group)
        s = (s * scale).masked_fill(~keep[..., q0:q1, :], float("-inf"))
        p16 = s.softmax(-1).to(torch.float16)
        o32 = None
        for k0, k1 in chunks:
            o32 = _weighted(p16[..., k0:k1], v16[:, :, k0:k1], mul, group, o32)
        out[:, :, :, q0:q1] = o32
    return out.view(B, Hq, Q, D).transpose(1, 2).to(query.dtype)
