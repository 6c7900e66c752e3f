"""Asymmetric min/max integer quantization (KIVI style), the scalar quantizer of the cache.

``x ~= code * scale + zero`` with ``zero = min``, ``scale = (max - min) / (2**bits - 1)``
over a group, round to nearest. Scale and zero are stored in fp16; codes are computed
against the fp16-rounded scale and zero, so dequantization reproduces exactly what the
encoder saw.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
_TINY = 1e-5  # fp16-representable floor for constant groups (a zero scale would divide by 0)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one (scale, zero) per slice reduced over ``dim``.

    Returns ``(codes uint8, scale fp16, zero fp16)``; scale and zero keep ``dim`` with size 1.
    """
    return quantize_levels(x, torch.tensor((1 << bits) - 1, device=x.device), dim)


def quantize_levels(
    x: torch.Tensor, levels: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`quantize`, with the number of levels (``2**bits - 1``) given per slice.

    ``levels`` broadcasts against the reduced shape, so slices (e.g. Kitty's boosted
    channels) may use different bit widths.
    """
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    levels = levels.to(xf.dtype)
    scale = ((hi - lo) / levels).clamp_min(_TINY).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    codes = torch.round((xf - zero.float()) / scale.float())
    codes = torch.minimum(codes.clamp_(min=0), levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def max_roundtrip_error(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Analytic bound on ``|x - dequantize(quantize(x))|`` per slice.

    Half a quantization step, plus the fp16 rounding of zero and of the top level
    (``levels * scale``), which can push the largest value past the clamp.
    """
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    step = ((hi - lo) / levels).clamp_min(_TINY)
    fp16_eps = 2.0**-10
    return 0.5 * step * (1 + fp16_eps) + fp16_eps * (lo.abs() + levels * step)
