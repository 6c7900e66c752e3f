"""Triton kernel of the AxCore grouped GEMM, in the artifact's accumulation order.

Each program owns a ``BLOCK_M x BLOCK_N`` output tile. Per input group it adds the
products one input channel at a time into an fp16 accumulator (one fp16 rounding per add,
as the artifact's ``__hadd`` loop), multiplies the fp16 sum by the fp16 group scale and
accumulates that in fp32; the output is fp16. Products are formed with the same bit rule
as ``Multiplier`` (one signed offset per (format, code)), so they are bit-exact with the
CPU emulation; only the CPU path's summation order differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .formats import FP4Weight
from .mul import INF_BITS, Multiplier


@triton.jit
def _axcore_gemm_kernel(
    a_ptr, codes_ptr, scales_ptr, fmt_ptr, table_ptr, out_ptr,
    M, N, K, G, GROUP,
    EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for gi in range(0, G):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float16)
        fmt = tl.load(fmt_ptr + rn * G + gi, mask=n_ok, other=0).to(tl.int32)
        k_end = tl.minimum(gi * GROUP + GROUP, K)
        for kk in range(gi * GROUP, k_end):
            code = tl.load(codes_ptr + rn * K + kk, mask=n_ok, other=0).to(tl.int32)
            if EXACT:
                a = tl.load(a_ptr + rm * K + kk, mask=m_ok, other=0).to(tl.float16, bitcast=True)
                w = tl.load(table_ptr + fmt * 16 + code)  # fp16 value of the code
                prod = a[:, None] * w[None, :]
            else:
                bits = tl.load(a_ptr + rm * K + kk, mask=m_ok, other=0).to(tl.int32)
                mag = (bits & 0x7FFF)[:, None]
                sign = (bits & 0x8000)[:, None] ^ ((code >> 3) << 15)[None, :]
                d = tl.load(table_ptr + fmt * 16 + code)  # offset d[j]; j = code & 7
                r = tl.minimum(tl.maximum(mag + d[None, :], 0), 0x7C00)
                r = tl.where(mag >= 0x7C00, mag, r) | sign
                r = tl.where((mag == 0) | ((code & 7) == 0)[None, :], 0, r)
                prod = r.to(tl.int16).to(tl.float16, bitcast=True)
            part = part + prod
        scale = tl.load(scales_ptr + rn * G + gi, mask=n_ok, other=0.0)
        acc += (part * scale[None, :]).to(tl.float32)
    out = out_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


def _tables(mults: Sequence[Multiplier], device) -> tuple[torch.Tensor, bool]:
    exact = {m.exact for m in mults}
    if len(exact) != 1:
        raise ValueError("mixing exact and approximate multipliers is not supported")
    if exact.pop():
        table = torch.stack([m.fmt.values() for m in mults]).to(torch.float16)
        return table.reshape(-1).to(device), True
    rows = []
    for m in mults:
        d = m.offsets()
        rows.append(d + d)  # codes 8..15 share the magnitude offsets
    assert all(abs(v) < INF_BITS for r in rows for v in r)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1).to(device), False


def triton_approx_matmul(
    x: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier], block_m: int = 32, block_n: int = 32
) -> torch.Tensor:
    """fp16 ``[..., N]`` = AxCore GEMM of ``x [..., K]`` with ``w``; exact scale multiply only."""
    a = x.reshape(-1, x.shape[-1]).to(torch.float16).contiguous()
    m, (n, k) = a.shape[0], w.codes.shape
    n_groups = w.scales.shape[1]
    row_fmt = torch.stack([w.row_formats(gi) for gi in range(n_groups)], 1).contiguous()  # [N, G]
    table, exact = _tables(mults, a.device)
    out = torch.empty(m, n, dtype=torch.float16, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _axcore_gemm_kernel[grid](
        a.view(torch.int16), w.codes.contiguous(), w.scales.contiguous(), row_fmt, table, out,
        m, n, k, n_groups, w.group_size,
        EXACT=exact, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out.reshape(*x.shape[:-1], n)
