"""Vectorised CPU emulation of the AxCore grouped GEMM: ``y = x @ W^T`` with FP4 ``W``.

Hardware order (artifact kernel): fp16 products summed in fp16 over one group of input
channels, the fp16 sum times the row's fp16 group scale, fp32 accumulation across groups,
fp16 output. Here every product is bit-exact, but a group's products are summed in fp32 and
rounded to fp16 once, instead of one fp16 rounding per add (see ``group_sum_error_bound``).

Speed: a product depends only on (activation, code), and within one multiplier "class"
(``Multiplier.classes``) codes differ only by a power of two. So each group costs one
``[M, C*g] @ [C*g, N]`` matmul, C = number of classes (1 for E3M0, 2 for E2M1, 4 for E1M2),
against signed powers of two (with mixed tiles, each format only over its own output rows).
Activations whose products leave the normal range (where the power-of-two identity fails)
are left out of that and added from an exact per-code table. Nothing of size M x K x N is
formed; temporaries are O(M K C + K N C + M N).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .formats import FP4Weight
from .mul import Multiplier, fp16_approx_mul

FP16_UNIT_ROUNDOFF = 2.0**-11
_FIXUP_CHUNK = 1 << 22  # elements of the [entries, N] fix-up block built at once


def group_sums(a: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(g, S_g)``, ``S_g[i, n] = sum_{k in group g} product(a[i, k], code[n, k])`` in fp32.

    ``a [M, K]`` fp16; ``mults[f]`` multiplies the rows/groups whose tile format id is ``f``.
    ``S_g`` is one reused buffer: consume it before advancing.
    """
    n, k = w.codes.shape
    g = w.group_size
    n_groups = -(-k // g)
    pad = n_groups * g - k
    a = F.pad(a, (0, pad)).view(-1, n_groups, g).transpose(0, 1).contiguous()  # [G, M, g]
    idx = F.pad(w.codes, (0, pad)).long()
    idx_g = idx.view(n, n_groups, g).permute(1, 2, 0)  # [G, g, N]
    row_fmt = torch.stack([w.row_formats(gi) for gi in range(n_groups)])  # [G, N]
    present = row_fmt.unique().tolist()
    parts, fixups = [], []
    for fid in present:
        mult = mults[fid]
        regular = mult.regular(a)
        dense = regular & (a != 0)
        acts, weights = [], []
        for ref, shifts in mult.classes():
            acts.append(mult.regular_product(a, ref).float().masked_fill_(~dense, 0))
            lut = torch.zeros(16)
            for j, s in shifts.items():
                lut[j], lut[j | 8] = 2.0**s, -(2.0**s)
            weights.append(lut[idx_g])
        w_all = torch.cat(weights, 1)  # [G, C*g, N]
        rows = (row_fmt == fid) if len(present) > 1 else None
        # mixed tiles: per group, only this format's output rows take part
        cols = [None] * n_groups if rows is None else [r.nonzero(as_tuple=True)[0] for r in rows]
        w_g = [w_all[gi] if c is None else w_all[gi][:, c] for gi, c in enumerate(cols)]
        parts.append((torch.cat(acts, 2), w_g, cols))  # acts: [G, M, C*g]
        if not regular.all():
            fixups.append(_irregular(a, ~regular, mult, None if rows is None else rows.float()))
    buf = a.new_empty(a.shape[1], n, dtype=torch.float32)
    idx_t = idx.T  # [K, N]
    for gi in range(n_groups):
        for p_all, w_g, cols in parts:
            if cols[gi] is None:
                torch.mm(p_all[gi], w_g[gi], out=buf)
            elif cols[gi].numel():
                buf[:, cols[gi]] = p_all[gi] @ w_g[gi]
        for grp, rows_i, kk, table, rows in fixups:
            sel = grp == gi
            if sel.any():
                _add_products(buf, rows_i[sel], kk[sel], table[sel], idx_t, None if rows is None else rows[gi])
        yield gi, buf


def _irregular(a, mask, mult, rows):
    """Exact per-code products of the activations ``a [G, M, g]`` left out of the matmul."""
    grp, i, kk = mask.nonzero(as_tuple=True)
    table = mult(a[grp, i, kk][:, None], torch.arange(16, dtype=torch.uint8)[None, :]).float()  # [u, 16]
    return grp, i, grp * a.shape[2] + kk, table, rows


def _add_products(buf, i, kk, table, idx_t, rows) -> None:
    step = max(1, _FIXUP_CHUNK // buf.shape[1])
    for s in range(0, i.numel(), step):
        contrib = torch.gather(table[s : s + step], 1, idx_t[kk[s : s + step]])
        if rows is not None:
            contrib *= rows
        buf.index_add_(0, i[s : s + step], contrib)


def _scale(s: torch.Tensor, scale: torch.Tensor, approx_dequant: bool) -> torch.Tensor:
    """fp16 group sum times fp16 scale, rounded to fp16."""
    s16 = s.to(torch.float16)
    if approx_dequant:
        return fp16_approx_mul(s16, scale, comp=0)
    return torch.mul(s16, scale, out=s16)  # fp16 x fp16 is exact in fp32: one rounding


def approx_matmul(
    x: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier], approx_dequant: bool = False
) -> torch.Tensor:
    """Emulated AxCore GEMM of ``x [..., K]`` with ``w`` (``[N, K]``); returns fp16 ``[..., N]``.

    ``mults[f]`` multiplies the tiles whose format id is ``f``. ``approx_dequant`` applies the
    group scale with the fp16 approximate multiply without compensation, as the artifact
    does for its larger models; the default is the exact fp16 multiply.
    """
    a = x.reshape(-1, x.shape[-1]).to(torch.float16)
    out = a.new_zeros(a.shape[0], w.codes.shape[0], dtype=torch.float32)
    for gi, s in group_sums(a, w, mults):
        out += _scale(s, w.scales[:, gi], approx_dequant)
    return out.to(torch.float16).reshape(*x.shape[:-1], -1)


def scaled_group_outputs(
    x: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier], approx_dequant: bool = False
) -> torch.Tensor:
    """fp16 ``[G, M, N]``: each group's fp16 sum times the group scale, for ``x [M, K]``."""
    a = x.to(torch.float16)
    return torch.stack([_scale(s, w.scales[:, gi], approx_dequant) for gi, s in group_sums(a, w, mults)])


def group_sum_error_bound(products_abs_sum: torch.Tensor, group_len: int) -> torch.Tensor:
    """Bound on |fast fp16 group sum - sequential fp16 group sum| given ``sum |p_k|``.

    Sequential fp16 accumulation of n terms is within ``(n-1) u sum|p|`` of the exact sum
    (u = 2**-11, first-order Higham bound, padded by 1 term); the fast path rounds an fp32
    sum (error <= n 2**-24 sum|p|) to fp16 once (u |sum|). Subnormal-range sums add an
    absolute half-ulp of 2**-25 per rounding.
    """
    rel = (group_len + 1) * FP16_UNIT_ROUNDOFF + group_len * 2.0**-24
    return products_abs_sum * rel + (group_len + 1) * 2.0**-25
