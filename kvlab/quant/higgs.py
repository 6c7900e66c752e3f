"""HIGGS vector quantization: per-group norm scale, Hadamard rotation, nearest point of a Gaussian grid.

A row of ``C`` values is cut into groups of ``G`` (a power of two). For each group the L2
norm ``s`` is stored in fp16; the group is rotated by the orthonormal Walsh-Hadamard
transform and multiplied by ``sqrt(G) / s``, which makes its entries approximately
N(0, 1). The rotated group is cut into ``d``-dimensional pieces, and each piece is
replaced by the index of the nearest point of an MSE-optimal ``n``-point grid for
N(0, I_d) (an "EDEN" grid, built here by Lloyd iterations on Gaussian samples).
Indices are bit-packed, ``log2(n)`` bits each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from kvlab.quant.bitpack import pack_bits, packed_bytes, unpack_bits

SCALE_DTYPE = torch.float16

# Grid construction. Changing any of these changes the grids: bump GRID_VERSION too,
# because the version is part of the on-disk cache key.
GRID_VERSION = 1
_SAMPLES_PER_POINT = 1024
_MIN_SAMPLES, _MAX_SAMPLES = 2**16, 2**20
_STAGES = (16, 4, 1)  # coarse to fine: Lloyd on 1/16, then 1/4, then all of the samples
# Lloyd has local optima (about 2% apart in MSE for d=2, n=16): small grids keep the best of
# several restarts. With many points the optima average out, and restarts cost more.
_RESTART_POINTS = 128
_MAX_RESTARTS = 8
_MAX_ITERS = 1000
_REL_TOL = 1e-5

_SEARCH_CHUNK_ELEMS = 2**22  # bound on the (points x grid) score matrix of one search chunk

_grid_memo: dict[tuple[int, int, int], torch.Tensor] = {}


_DENSE_HADAMARD_MAX = 256  # up to this size one matmul beats log2(size) butterfly passes
_hadamard_memo: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _hadamard_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix (symmetric), memoised per size, dtype and device."""
    key = (size, dtype, device)
    if key not in _hadamard_memo:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _hadamard_memo[key] = (h / math.sqrt(size)).to(device=device, dtype=dtype)
    return _hadamard_memo[key]


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dim (Sylvester order).

    The transform is symmetric and its own inverse. ``x.shape[-1]`` must be a power of two.
    Small sizes use one matmul with the dense matrix; larger ones the O(G log G) butterflies.
    """
    size = x.shape[-1]
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    if size <= _DENSE_HADAMARD_MAX:
        return x @ _hadamard_matrix(size, x.dtype, x.device)
    out = x.reshape(-1, size)
    half = 1
    while half < size:
        pairs = out.view(-1, size // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        out = torch.stack((a + b, a - b), dim=2)
        half *= 2
    return (out / math.sqrt(size)).reshape(x.shape)


def nearest_grid_point(points: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid row for each row of ``points`` [N, d]; chunked to bound memory."""
    grid = grid.to(points.dtype)
    grid_sq = grid.square().sum(-1)
    idx = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    step = max(1, _SEARCH_CHUNK_ELEMS // grid.shape[0])
    for start in range(0, points.shape[0], step):
        chunk = points[start : start + step]
        # argmin ||p - g||^2 == argmax (2 p.g - ||g||^2)
        idx[start : start + step] = torch.addmm(grid_sq, chunk, grid.T, beta=-1, alpha=2).argmax(-1)
    return idx


def grid_mse(grid: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean squared error per dimension of rounding ``samples`` [N, d] to the nearest grid point."""
    idx = nearest_grid_point(samples, grid)
    return (samples - grid.to(samples.dtype)[idx]).square().mean().item()


def _lloyd(samples: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Lloyd iterations from ``grid`` until the distortion improves by less than _REL_TOL."""
    n, d = grid.shape
    sums = torch.zeros(n, d, dtype=torch.float64)
    samples64 = samples.double()
    prev_mse = math.inf
    for _ in range(_MAX_ITERS):
        idx = nearest_grid_point(samples, grid)
        mse = (samples - grid[idx]).square().mean().item()
        if prev_mse - mse <= _REL_TOL * mse:
            break
        prev_mse = mse
        sums.zero_().index_add_(0, idx, samples64)
        counts = torch.bincount(idx, minlength=n).unsqueeze(-1)
        # an empty cell keeps its point (rare: every stage has at least ~64 samples per point)
        grid = torch.where(counts > 0, sums / counts.clamp_min(1), grid.double()).float()
    return grid


def build_eden_grid(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """Compute an ``n``-point MSE grid for N(0, I_d) by Lloyd iterations (no caching). Returns [n, d]."""
    if d < 1 or n < 2:
        raise ValueError(f"need d >= 1 and n >= 2, got d={d}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    num = min(_MAX_SAMPLES, max(_MIN_SAMPLES, _SAMPLES_PER_POINT * n))
    samples = torch.randn(num, d, generator=gen)
    coarse = samples[: max(num // _STAGES[0], n)]
    restarts = max(1, min(_MAX_RESTARTS, _RESTART_POINTS // n))
    candidates = [
        _lloyd(coarse, coarse[torch.randperm(coarse.shape[0], generator=gen)[:n]]) for _ in range(restarts)
    ]
    grid = min(candidates, key=lambda g: grid_mse(g, samples))
    for fraction in _STAGES[1:]:
        grid = _lloyd(samples[: max(num // fraction, n)], grid)
    return grid


def _cache_dir() -> Path:
    root = os.environ.get("KVLAB_CACHE_DIR") or Path.home() / ".cache" / "kvlab"
    return Path(root) / "grids"


def eden_grid(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """The ``n``-point grid for N(0, I_d), [n, d] float32; memoised in memory and on disk.

    The disk cache lives in ``$KVLAB_CACHE_DIR/grids`` (default ``~/.cache/kvlab/grids``).
    Codes index this exact tensor, so anything decoding codes must use the same grid:
    :meth:`HiggsQuantizer.config` carries it.
    """
    key = (d, n, seed)
    if key not in _grid_memo:
        path = _cache_dir() / f"eden_d{d}_n{n}_seed{seed}_v{GRID_VERSION}.pt"
        if path.exists():
            grid = torch.load(path, weights_only=True)
        else:
            grid = build_eden_grid(d, n, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(grid, tmp)
            os.replace(tmp, path)  # atomic: concurrent builders cannot leave a torn file
        if grid.shape != (n, d):
            raise ValueError(f"grid file {path} has shape {tuple(grid.shape)}, expected {(n, d)}")
        _grid_memo[key] = grid
    return _grid_memo[key].clone()


class HiggsCodes(NamedTuple):
    """Quantized rows: ``codes`` uint8 [..., bytes_per_row], ``scales`` fp16 [..., C // group_size]."""

    codes: torch.Tensor
    scales: torch.Tensor


class HiggsQuantizer:
    """HIGGS quantizer over the last dim with ``d``-dim pieces, an ``n``-point grid and Hadamard groups."""

    def __init__(self, d: int, n: int, group_size: int, grid: torch.Tensor | None = None) -> None:
        if n & (n - 1) or not 2 <= n <= 2**16:
            raise ValueError(f"grid size n must be a power of two in [2, 65536], got {n}")
        if group_size & (group_size - 1) or group_size % d:
            raise ValueError(f"group_size must be a power of two divisible by d={d}, got {group_size}")
        self.d, self.n, self.group_size = d, n, group_size
        self.index_bits = n.bit_length() - 1
        self.grid = eden_grid(d, n) if grid is None else grid.float().clone()
        if self.grid.shape != (n, d):
            raise ValueError(f"grid must have shape {(n, d)}, got {tuple(self.grid.shape)}")

    @property
    def bits_per_value(self) -> float:
        """Storage cost: index bits per value plus the fp16 scale shared by a group."""
        return self.index_bits / self.d + torch.finfo(SCALE_DTYPE).bits / self.group_size

    def config(self) -> dict:
        return {"d": self.d, "n": self.n, "group_size": self.group_size, "grid": self.grid.clone()}

    @classmethod
    def from_config(cls, config: dict) -> HiggsQuantizer:
        return cls(config["d"], config["n"], config["group_size"], grid=config["grid"])

    def quantize(self, x: torch.Tensor) -> HiggsCodes:
        """Quantize ``x`` [..., C] (C a multiple of group_size) to packed codes and fp16 scales."""
        width = x.shape[-1]
        if width % self.group_size:
            raise ValueError(f"last dim {width} is not a multiple of group_size {self.group_size}")
        lead = x.shape[:-1]
        groups = x.float().reshape(*lead, width // self.group_size, self.group_size)
        scales = groups.norm(dim=-1).to(SCALE_DTYPE)
        if not torch.isfinite(scales).all():
            raise ValueError("a group norm overflows fp16 (or the input is not finite)")
        # normalise by the stored (rounded) scale, so the codes are chosen for what the decoder sees
        s = scales.float()
        factor = torch.where(s > 0, math.sqrt(self.group_size) / s, torch.zeros_like(s))
        rotated = hadamard_transform(groups) * factor.unsqueeze(-1)
        idx = nearest_grid_point(rotated.reshape(-1, self.d), self.grid.to(x.device))
        codes = pack_bits(idx.reshape(*lead, width // self.d), self.index_bits)
        return HiggsCodes(codes, scales)

    def dequantize(self, q: HiggsCodes) -> torch.Tensor:
        """Reconstruct float32 [..., C] from :meth:`quantize` output."""
        num_groups = q.scales.shape[-1]
        width = num_groups * self.group_size
        lead = q.scales.shape[:-1]
        if q.codes.shape[-1] != packed_bytes(width // self.d, self.index_bits):
            raise ValueError(f"codes have {q.codes.shape[-1]} bytes per row, expected "
                             f"{packed_bytes(width // self.d, self.index_bits)} for width {width}")
        idx = unpack_bits(q.codes, self.index_bits, width // self.d)
        rotated = self.grid.to(q.codes.device)[idx].reshape(*lead, num_groups, self.group_size)
        rotated = rotated * (q.scales.float() / math.sqrt(self.group_size)).unsqueeze(-1)
        return hadamard_transform(rotated).reshape(*lead, width)
