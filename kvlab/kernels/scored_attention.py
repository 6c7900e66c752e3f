"""Decode attention that also returns the attention mass each key receives (eviction scores).

The Triton twin of :func:`kvlab.eviction.scored_attention` for a few query tokens (decode,
speculative or chunked steps). One program owns one (batch row, KV head) and all the query rows
of its GQA group, so the per-key mass is a plain sum over those rows, with no atomics. Two passes
over the keys: the first finds each row's softmax max and normaliser (online), the second forms
the exact probabilities, accumulates ``P @ V`` and writes the mass of each key block. Causal
(the last ``q`` keys are the queries' own) or driven by a boolean mask; padded query rows
(``query_valid``) and rows before ``first_row`` add no mass. Nothing of size ``q x N`` is kept
in global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.decode_attention import safe_dot

MAX_ROWS = 64  # query heads per KV head x query tokens handled by one program


@triton.jit
def _block_logits(q, K, MASK, b, h, t, row_ok, n, N, QLEN, skb, skh, skn, smb, smh, smq, smn, scale,
                  D: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scaled logits of the query rows against keys ``n``; -inf where a row may not attend."""
    d = tl.arange(0, D)
    k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=(n < N)[:, None], other=0.0)
    s = safe_dot(q, tl.trans(k)).to(tl.float32) * scale
    if HAS_MASK:
        allowed = tl.load(MASK + b * smb + h * smh + t[:, None] * smq + n[None, :] * smn,
                          mask=row_ok[:, None] & (n < N)[None, :], other=0) != 0
    else:
        allowed = n[None, :] <= (N - QLEN + t)[:, None]
    return tl.where(allowed & row_ok[:, None] & (n < N)[None, :], s, float("-inf"))


@triton.jit
def _scored_attention_kernel(
    Q, K, V, MASK, QVALID, OUT, MASS,
    sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, smb, smh, smq, smn, sob, soh, sot, swb, swh,
    N, QLEN, first_row, scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_QVALID: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, ROWS)
    j = r // QLEN  # query head within the group
    t = r % QLEN  # query token
    row_ok = r < G * QLEN
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None],
                other=0.0)
    weight = (row_ok & (t >= first_row)).to(tl.float32)
    if HAS_QVALID:
        weight *= tl.load(QVALID + b * QLEN + t, mask=row_ok, other=0).to(tl.float32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for n0 in range(0, N, BLOCK_N):  # pass 1: softmax max and normaliser per row
        n = n0 + tl.arange(0, BLOCK_N)
        s = _block_logits(q, K, MASK, b, h, t, row_ok, n, N, QLEN, skb, skh, skn, smb, smh, smq, smn, scale,
                          D, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)

    acc = tl.zeros([ROWS, D], tl.float32)
    for n0 in range(0, N, BLOCK_N):  # pass 2: exact probabilities, P @ V and each key's mass
        n = n0 + tl.arange(0, BLOCK_N)
        s = _block_logits(q, K, MASK, b, h, t, row_ok, n, N, QLEN, skb, skh, skn, smb, smh, smq, smn, scale,
                          D, HAS_MASK)
        p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]
        v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=(n < N)[:, None], other=0.0)
        acc += safe_dot(p.to(v.dtype), v).to(tl.float32)
        tl.store(MASS + b * swb + h * swh + n, tl.sum(p * weight[:, None], 0), mask=n < N)
    tl.store(OUT + b * sob + (h * G + j)[:, None] * soh + t[:, None] * sot + d[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


def supported(query: torch.Tensor, key: torch.Tensor, attention_mask) -> bool:
    """Whether the kernel handles this call (otherwise use the PyTorch reference)."""
    B, Hq, q, D = query.shape
    rows = (Hq // key.shape[1]) * q
    mask_ok = attention_mask is None or attention_mask.dtype == torch.bool
    return rows <= MAX_ROWS and D >= 16 and D & (D - 1) == 0 and mask_ok


def scored_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                            scaling: float | None, first_row: int = 0,
                            query_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`kvlab.eviction.scored_attention` (boolean or no mask)."""
    B, Hq, q, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = Hq // Hkv
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    if key.stride(3) != 1 or value.stride(3) != 1:
        key, value = key.clone(), value.clone()
    out = torch.empty_like(query)
    mass = torch.empty(B, Hkv, N, device=query.device, dtype=torch.float32)
    mask = None if attention_mask is None else attention_mask[:, :, -q:, -N:]
    m_strides = (0, 0, 0, 0) if mask is None else tuple(
        0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    qv = None if query_valid is None else query_valid.to(torch.int8).contiguous()
    rows = max(16, triton.next_power_of_2(G * q))
    _scored_attention_kernel[(B, Hkv)](
        query, key, value, mask if mask is not None else query, qv if qv is not None else query, out, mass,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *m_strides,
        out.stride(0), out.stride(1), out.stride(2), mass.stride(0), mass.stride(1),
        N, q, first_row, scaling if scaling is not None else D**-0.5,
        G=G, ROWS=rows, D=D, BLOCK_N=64, HAS_MASK=mask is not None, HAS_QVALID=qv is not None,
    )
    return out.transpose(1, 2).contiguous(), mass
