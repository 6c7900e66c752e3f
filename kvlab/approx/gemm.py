"""Vectorised CPU emulation of the AxCore grouped GEMM: ``y = x @ W^T`` with FP4 ``W``.

Hardware order (artifact kernel): fp16 products summed in fp16 over one group of input
channels, the fp16 sum times the row's fp16 group scale, fp32 accumulation across groups,
fp16 output. Here every product is bit-exact, but a group's products are summed in fp32 and
rounded to fp16 once, instead of one fp16 rounding per add (see ``group_sum_error_bound``).

Speed: a product depends only on (activation, code), and within one multiplier "class"
(``Multiplier.classes``) codes differ only by a power of two. So a group of output rows of
one format costs one ``[M, C*g] @ [C*g, rows]`` matmul, C = number of classes (1 for E3M0,
2 for E2M1, 4 for E1M2), against signed powers of two. ``GemmPlan`` builds those weight
matrices once per weight, for each run of consecutive output rows that share a format in a
group (a mixed-format weight has a few runs per group). Activations whose products leave the
normal range (where the power-of-two identity fails) are left out of the matmuls and added
from an exact per-code table. Nothing of size M x K x N is formed; temporaries are
O(M K C + M N).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

from .formats import FP4Weight
from .mul import Multiplier, fp16_approx_mul

FP16_UNIT_ROUNDOFF = 2.0**-11
_FIXUP_CHUNK = 1 << 22  # elements of the [entries, N] fix-up block built at once


def _class_weights(codes: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """``[C*g, R]`` fp32 for the codes ``[R, g]`` of one group: class ``c``'s rows hold the
    signed power of two ``product(a, code) / product(a, ref_c)`` of the codes in that class, 0
    elsewhere."""
    idx = codes.T.long()
    blocks = []
    for _, shifts in mult.classes():
        lut = torch.zeros(16, device=codes.device)
        for j, s in shifts.items():
            lut[j], lut[j | 8] = 2.0**s, -(2.0**s)
        blocks.append(lut[idx])
    return torch.cat(blocks).contiguous()


class GemmPlan:
    """The emulated GEMM for one FP4 weight ``w [N, K]``, with its per-weight constants built
    once (the class weights take 4 C bytes per weight); ``mults[f]`` multiplies the tiles whose
    format id is ``f``."""

    def __init__(self, w: FP4Weight, mults: Sequence[Multiplier]) -> None:
        n, k = w.codes.shape
        g = self.group_size = w.group_size
        n_groups = self.n_groups = -(-k // g)
        self.pad = n_groups * g - k
        row_fmt = torch.stack([w.row_formats(gi) for gi in range(n_groups)]).long()  # [G, N]
        present = row_fmt.unique()
        self.mults = [mults[f] for f in present.tolist()]
        slot = torch.searchsorted(present, row_fmt)  # [G, N]: index into self.mults
        codes = F.pad(w.codes, (0, self.pad)).view(n, n_groups, g)
        # per group: (slot, r0, r1, class weights) for each run of rows r0:r1 of one format
        self.runs: list[list[tuple[int, int, int, torch.Tensor]]] = []
        for gi in range(n_groups):
            edges = [0, *((slot[gi, 1:] != slot[gi, :-1]).nonzero().flatten() + 1).tolist(), n]
            runs = []
            for r0, r1 in pairwise(edges):
                s = int(slot[gi, r0])
                runs.append((s, r0, r1, _class_weights(codes[r0:r1, gi], self.mults[s])))
            self.runs.append(runs)
        # column of the exact-product table (16 codes per format slot) for each weight [G*g, N]
        self.table_col = (codes + 16 * slot.T.unsqueeze(-1).to(torch.uint8)).view(n, -1).T.contiguous()
        self.scales = w.scales.T.contiguous()  # [G, N]
        self.ranges = [mult.regular_range() for mult in self.mults]

    def group_sums(self, a: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(g, S_g)``, ``S_g[i, n] = sum_{k in group g} product(a[i, k], code[n, k])`` in
        fp32, for ``a [M, K]`` fp16. ``S_g`` is one reused buffer: consume it before advancing."""
        m, g, n_groups = a.shape[0], self.group_size, self.n_groups
        a = F.pad(a, (0, self.pad)).contiguous()
        mag = a.view(torch.int16) & 0x7FFF
        regular = [(mag >= lo) & (mag < hi) for lo, hi in self.ranges]  # per format, nonzero ones
        acts = []  # per format [M, G, C, g] fp16: the class references' products, 0 where not regular
        for mult, reg in zip(self.mults, regular):
            keep = reg.to(torch.int16).neg_().view(m, n_groups, 1, g)  # all ones where regular
            refs = torch.stack([mult.regular_product(a, ref).view(m, n_groups, g) for ref, _ in mult.classes()], 2)
            acts.append(refs.view(torch.int16).bitwise_and_(keep).view(torch.float16))
        # the other nonzero activations: exact products from a table (for the formats they are
        # not regular for, 0 for the others), ordered by group
        rows, kk = (~torch.stack(regular).all(0) & (mag != 0)).nonzero(as_tuple=True)
        order = torch.argsort(kk // g, stable=True)
        rows, kk = rows[order], kk[order]
        ends = torch.bincount(kk // g, minlength=n_groups).cumsum(0).tolist()
        codes16 = torch.arange(16, dtype=torch.uint8, device=a.device)
        vals = a[rows, kk][:, None]
        table = torch.cat(  # [entries, 16 * formats]
            [
                mult(vals, codes16).float().masked_fill_(reg[rows, kk, None], 0)
                for mult, reg in zip(self.mults, regular)
            ],
            1,
        )
        buf = a.new_empty(m, self.scales.shape[1], dtype=torch.float32)
        start = 0
        for gi, runs in enumerate(self.runs):
            a32 = {s: acts[s][:, gi].reshape(m, -1).float() for s, *_ in runs}
            for s, r0, r1, wts in runs:
                torch.mm(a32[s], wts, out=buf[:, r0:r1])
            step = max(1, _FIXUP_CHUNK // buf.shape[1])
            for u0 in range(start, ends[gi], step):
                u = slice(u0, min(u0 + step, ends[gi]))
                buf.index_add_(0, rows[u], torch.gather(table[u], 1, self.table_col[kk[u]].long()))
            start = ends[gi]
            yield gi, buf

    def scaled_groups(self, a: torch.Tensor, approx_dequant: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(g, fp16 S_g times the group scales)`` for ``a [M, K]`` fp16 (a reused buffer)."""
        s16 = a.new_empty(a.shape[0], self.scales.shape[1])
        for gi, s in self.group_sums(a):
            if approx_dequant:
                yield gi, fp16_approx_mul(s, self.scales[gi], comp=0)
            else:  # fp16 x fp16 is exact in fp32: one rounding
                yield gi, s16.copy_(s).mul_(self.scales[gi])

    def matmul(self, x: torch.Tensor, approx_dequant: bool = False) -> torch.Tensor:
        """fp16 ``[..., N]`` for ``x [..., K]``: the groups' scaled fp16 sums added in fp32.

        ``approx_dequant`` applies the group scale with the fp16 approximate multiply without
        compensation, as the artifact does for its larger models; the default is the exact
        fp16 multiply."""
        a = x.reshape(-1, x.shape[-1]).to(torch.float16)
        out = a.new_zeros(a.shape[0], self.scales.shape[1], dtype=torch.float32)
        part32 = torch.empty_like(out)
        for _, part in self.scaled_groups(a, approx_dequant):
            out += part32.copy_(part)  # faster than adding the fp16 tensor
        return out.to(torch.float16).reshape(*x.shape[:-1], -1)


def approx_matmul(
    x: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier], approx_dequant: bool = False
) -> torch.Tensor:
    """Emulated AxCore GEMM of ``x [..., K]`` with ``w`` (``[N, K]``); returns fp16 ``[..., N]``
    (``GemmPlan.matmul``; a layer used more than once should keep its plan)."""
    return GemmPlan(w, mults).matmul(x, approx_dequant)


def group_sum_error_bound(products_abs_sum: torch.Tensor, group_len: int) -> torch.Tensor:
    """Bound on |fast fp16 group sum - sequential fp16 group sum| given ``sum |p_k|``.

    Sequential fp16 accumulation of n terms is within ``(n-1) u sum|p|`` of the exact sum
    (u = 2**-11, first-order Higham bound, padded by 1 term); the fast path rounds an fp32
    sum (error <= n 2**-24 sum|p|) to fp16 once (u |sum|). Subnormal-range sums add an
    absolute half-ulp of 2**-25 per rounding.
    """
    rel = (group_len + 1) * FP16_UNIT_ROUNDOFF + group_len * 2.0**-24
    return products_abs_sum * rel + (group_len + 1) * 2.0**-25
