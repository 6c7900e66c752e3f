"""Adaptive FP4 format selection ("AxCore" full): per tile of ``tile_rows`` output rows x one
input group, keep the format whose approximate output is closest (MSE) to the fp16 output
on calibration activations, the output being computed through the approximate GEMM itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .formats import FORMATS, FP4Weight, quantize_weight
from .gemm import GemmPlan
from .mul import Multiplier, multipliers


@torch.no_grad()
def select_formats(
    w: torch.Tensor,
    group_size: int,
    calib: torch.Tensor,
    mults: Sequence[Multiplier] | None = None,
    tile_rows: int = 64,
    approx_dequant: bool = False,
) -> tuple[FP4Weight, torch.Tensor]:
    """Quantize ``w [N, K]`` choosing a format per tile; ``calib [T, K]`` activations.

    Returns the mixed-format weight and the per-tile, per-format MSE ``[3, tiles, groups]``.
    """
    mults = tuple(mults) if mults is not None else multipliers("axcore")
    x = calib.reshape(-1, w.shape[1]).to(torch.float16)
    n, k = w.shape
    n_tiles = -(-n // tile_rows)
    w16 = w.to(torch.float16).float()
    candidates = [quantize_weight(w, fmt, group_size, tile_rows) for fmt in FORMATS]
    n_groups = candidates[0].scales.shape[1]
    mse = torch.empty(len(FORMATS), n_tiles, n_groups)
    tile_of_row = torch.arange(n, device=w.device) // tile_rows
    counts = torch.bincount(tile_of_row, minlength=n_tiles).float() * x.shape[0]
    for fid, cand in enumerate(candidates):
        for gi, part in GemmPlan(cand, mults).scaled_groups(x, approx_dequant):
            k0 = gi * group_size
            ref = x[:, k0 : k0 + group_size].float() @ w16[:, k0 : k0 + group_size].T
            err = ((part.float() - ref) ** 2).sum(0)  # per output row
            mse[fid, :, gi] = torch.zeros(n_tiles).index_add_(0, tile_of_row, err) / counts
    best = mse.argmin(0).to(torch.uint8)
    return _assemble(candidates, best, group_size, tile_rows), mse


def _assemble(candidates: list[FP4Weight], best: torch.Tensor, group_size: int, tile_rows: int) -> FP4Weight:
    n, k = candidates[0].codes.shape
    row_best = best.repeat_interleave(tile_rows, dim=0)[:n]  # [N, groups]
    codes = torch.empty_like(candidates[0].codes)
    scales = torch.empty_like(candidates[0].scales)
    col_best = row_best.repeat_interleave(group_size, dim=1)[:, :k]
    for fid, cand in enumerate(candidates):
        codes = torch.where(col_best == fid, cand.codes, codes)
        scales = torch.where(row_best == fid, cand.scales, scales)
    return FP4Weight(codes, scales, best, group_size, tile_rows)
