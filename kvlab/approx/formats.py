"""FP4 weight formats (E3M0, E2M1, E1M2) and their per-row, per-group quantizer.

A 4-bit code is ``sign << 3 | j`` where the magnitude index ``j`` packs the format's
exponent and mantissa fields: ``j = e << mbits | m``. With ``e == 0`` the value is
subnormal (``m * 2**(1 - bias - mbits)``); otherwise ``(1 + m / 2**mbits) * 2**(e - bias)``.
The biases (``2**(ebits-1) - 1``) give E3M0 {0, .25, .5, 1, 2, 4, 8, 16},
E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6} and E1M2 {0, .5, 1, 1.5, 2, 2.5, 3, 3.5}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class FP4Format:
    name: str
    ebits: int
    mbits: int

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    def fields(self, j: int) -> tuple[int, int]:
        return j >> self.mbits, j & ((1 << self.mbits) - 1)

    def magnitude(self, j: int) -> float:
        e, m = self.fields(j)
        if e == 0:
            return m * 2.0 ** (1 - self.bias - self.mbits)
        return (1 + m / (1 << self.mbits)) * 2.0 ** (e - self.bias)

    @property
    def magnitudes(self) -> list[float]:
        return [self.magnitude(j) for j in range(8)]

    @property
    def max_value(self) -> float:
        return self.magnitude(7)

    def values(self) -> torch.Tensor:
        """Signed value of every code 0..15 (float32)."""
        mags = self.magnitudes
        return torch.tensor(mags + [-v for v in mags], dtype=torch.float32)


E3M0 = FP4Format("e3m0", 3, 0)
E2M1 = FP4Format("e2m1", 2, 1)
E1M2 = FP4Format("e1m2", 1, 2)
FORMATS: tuple[FP4Format, ...] = (E3M0, E2M1, E1M2)  # index = format id = mantissa bits
FORMAT_BY_NAME = {f.name: f for f in FORMATS}


def round_to_format(x: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    """Codes (uint8) of ``x`` rounded to nearest, ties to even significand; clamps at max."""
    mag = x.float().abs().clamp(max=fmt.max_value)
    # frexp gives the binade exactly (log2 can misround next to powers of two);
    # below the smallest normal the spacing is the subnormal one.
    _, exp = torch.frexp(mag)
    binade = torch.clamp(exp - 1, min=1 - fmt.bias)
    ulp = torch.pow(2.0, (binade - fmt.mbits).float())
    rounded = torch.round(mag / ulp) * ulp  # torch.round is half-to-even
    grid = torch.tensor(fmt.magnitudes, dtype=torch.float32, device=x.device)
    j = torch.searchsorted(grid, rounded.contiguous())
    sign = (x < 0) & (j > 0)
    return (j | (sign.to(j.dtype) << 3)).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    return fmt.values().to(codes.device)[codes.long()]


@dataclass
class FP4Weight:
    """Codes ``[N, K]`` (uint8), fp16 scales ``[N, ceil(K/g)]``, format ids per
    ``tile_rows x g`` tile ``[ceil(N/tile_rows), ceil(K/g)]`` (uint8 index into FORMATS)."""

    codes: torch.Tensor
    scales: torch.Tensor
    tile_formats: torch.Tensor
    group_size: int
    tile_rows: int = 64

    def row_formats(self, group: int) -> torch.Tensor:
        """Format id of every output row for one group, ``[N]``."""
        ids = self.tile_formats[:, group].repeat_interleave(self.tile_rows)
        return ids[: self.codes.shape[0]]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        out = torch.empty(n, k, dtype=torch.float32, device=self.codes.device)
        for gi, k0 in enumerate(range(0, k, self.group_size)):
            k1 = min(k0 + self.group_size, k)
            ids = self.row_formats(gi)
            for fid, fmt in enumerate(FORMATS):
                rows = ids == fid
                if rows.any():
                    vals = decode(self.codes[rows, k0:k1], fmt)
                    out[rows, k0:k1] = vals * self.scales[rows, gi : gi + 1].float()
        return out


def group_scales(w: torch.Tensor, fmt: FP4Format, group_size: int) -> torch.Tensor:
    """fp16 absmax scale per row and input group: ``max|w| / fmt.max_value``."""
    n, k = w.shape
    n_groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w.float().abs(), (0, n_groups * group_size - k))
    absmax = padded.view(n, n_groups, group_size).amax(-1)
    return (absmax / fmt.max_value).to(SCALE_DTYPE)


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, fmt: FP4Format, group_size: int) -> torch.Tensor:
    """Codes of ``w`` against the given (already fp16-rounded) scales; zero scale -> code 0."""
    s = scales.float().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = round_to_format(w.float() / safe, fmt)
    return torch.where(s > 0, codes, torch.zeros_like(codes))


def quantize_weight(
    w: torch.Tensor, fmt: FP4Format | str, group_size: int, tile_rows: int = 64
) -> FP4Weight:
    """Quantize ``w [N, K]`` to one FP4 format with a scale per row and group of ``group_size``."""
    fmt = FORMAT_BY_NAME[fmt] if isinstance(fmt, str) else fmt
    scales = group_scales(w, fmt, group_size)
    codes = quantize_codes(w, scales, fmt, group_size)
    n_tiles = -(-w.shape[0] // tile_rows)
    tiles = torch.full((n_tiles, scales.shape[1]), FORMATS.index(fmt), dtype=torch.uint8, device=w.device)
    return FP4Weight(codes, scales, tiles, group_size, tile_rows)
