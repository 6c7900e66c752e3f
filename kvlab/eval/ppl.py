"""Perplexity with the cache in the loop.

Each sample is a window of ``context_length`` tokens. The first ``prefill`` tokens go through
one forward call; every later token is fed through the cache (``chunk_size`` tokens per call),
so each scored token attends to exactly what it would see in deployment: the compressed past
and the full-precision residual. Only the tokens after the prefill are scored.

The ``full-sequence`` protocol is standard HF perplexity, as the AxCore artifact evaluates:
consecutive non-overlapping windows from the start of the text, each scored with a single
forward (every token but the first is a target; the cache sees the whole window at once).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from kvlab.cache import make_cache
from kvlab.eviction import kept_tokens
from kvlab.models import cache_kwargs


@dataclass(frozen=True)
class PplConfig:
    model: str
    dataset: str
    context_length: int
    prefill: int
    num_samples: int
    chunk_size: int = 1
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return asdict(self)


def validate(cfg: PplConfig, max_positions: int | None) -> None:
    if cfg.context_length < 2:
        raise ValueError(f"--context-length {cfg.context_length} must be at least 2")
    if max_positions and cfg.context_length > max_positions:
        raise ValueError(f"--context-length {cfg.context_length} exceeds the model's maximum of {max_positions} positions")
    if not 1 <= cfg.prefill < cfg.context_length:
        raise ValueError(f"--prefill {cfg.prefill} must be in [1, context length {cfg.context_length})")
    if cfg.num_samples < 1:
        raise ValueError(f"--num-samples {cfg.num_samples} must be at least 1")
    if cfg.chunk_size < 1:
        raise ValueError(f"--chunk-size {cfg.chunk_size} must be at least 1")


def draw_windows(n_tokens: int, context_length: int, num_samples: int, seed: int) -> list[int]:
    """Start offsets of ``num_samples`` non-overlapping windows, drawn by ``seed``."""
    slots = n_tokens // context_length
    if slots < num_samples:
        raise ValueError(
            f"the dataset has {n_tokens} tokens: room for {slots} windows of {context_length}, not {num_samples}"
        )
    rng = np.random.default_rng(seed)
    return sorted(int(s) * context_length for s in rng.choice(slots, size=num_samples, replace=False))


def sequence_windows(n_tokens: int, seqlen: int, max_windows: int = 0) -> list[int]:
    """Starts of the consecutive windows of ``seqlen`` tokens (the first ``max_windows``; 0: all)."""
    starts = list(range(0, n_tokens - seqlen + 1, seqlen))
    if not starts:
        raise ValueError(f"the dataset has {n_tokens} tokens: no room for one window of {seqlen}")
    return starts[:max_windows] if max_windows else starts


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, method, prefill: int, chunk_size: int, progress=None) -> dict:
    """Token NLLs of ``ids[prefill:]`` with a fresh ``method`` cache in the loop, and the cache's
    size after each call: tokens kept per head (mean over layers) and bytes."""
    cache = make_cache(method, model)
    out = model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    nll = [_nll(out.logits[:, -1:], ids[:, prefill : prefill + 1])]
    sizes, peak = [kept_tokens(cache)], cache.memory_bytes()
    end = ids.shape[1] - 1  # the last token is only a target
    for pos in range(prefill, end, chunk_size):
        stop = min(pos + chunk_size, end)
        out = model(ids[:, pos:stop], **cache_kwargs(model, cache), use_cache=True)
        nll.append(_nll(out.logits, ids[:, pos + 1 : stop + 1]))
        sizes.append(kept_tokens(cache))
        peak = max(peak, cache.memory_bytes())
        if progress is not None:
            progress.update(stop - pos)
    token_nll = torch.cat(nll)
    return {"nll_sum": float(token_nll.sum()), "tokens": token_nll.numel(), **cache.stats(),
            "avg_cache_tokens": float(np.mean(sizes)), "final_cache_tokens": sizes[-1], "peak_cache_bytes": peak}


@torch.inference_mode()
def full_sequence_nll(model, ids: torch.Tensor, method, prefill: int, chunk_size: int, progress=None) -> dict:
    """Token NLLs of ``ids[1:]`` from one forward over the window with a fresh ``method`` cache."""
    cache = make_cache(method, model)
    out = model(ids, **cache_kwargs(model, cache), use_cache=True)
    token_nll = _nll(out.logits[:, :-1], ids[:, 1:])
    if progress is not None:
        progress.update(token_nll.numel())
    kept = kept_tokens(cache)
    return {"nll_sum": float(token_nll.sum()), "tokens": token_nll.numel(), **cache.stats(),
            "avg_cache_tokens": kept, "final_cache_tokens": kept, "peak_cache_bytes": cache.memory_bytes()}


def run_unit(model, token_ids: torch.Tensor, cfg: PplConfig, method, seed: int, progress=None,
             done: Mapping[int, dict] | None = None, on_window: Callable[[dict], None] | None = None,
             protocol: str = "cache-loop") -> dict:
    """One (method, seed) unit: all windows of that seed.

    Windows in ``done`` (by start offset, from an interrupted run) are taken as they are; each window
    computed here goes to ``on_window`` as soon as it finishes. A window's numbers depend only on the
    model and its tokens (a fresh cache each), so a resumed unit equals an uninterrupted one.
    """
    if protocol == "full-sequence":  # cfg.num_samples consecutive windows, whatever the seed; prefill 1
        starts, score = sequence_windows(token_ids.numel(), cfg.context_length, cfg.num_samples), full_sequence_nll
    else:
        starts, score = draw_windows(token_ids.numel(), cfg.context_length, cfg.num_samples, seed), window_nll
    device = next(model.parameters()).device
    windows = []
    for start in starts:
        if done and start in done:
            windows.append(done[start])
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        ids = token_ids[start : start + cfg.context_length].unsqueeze(0).to(device)
        w = {"start": start, **score(model, ids, method, cfg.prefill, cfg.chunk_size, progress),
             "wall_time_s": time.perf_counter() - t0}
        if device.type == "cuda":
            w["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if on_window is not None:
            on_window(w)
        windows.append(w)
    nll = sum(w["nll_sum"] for w in windows)
    tokens = sum(w["tokens"] for w in windows)
    wall = sum(w["wall_time_s"] for w in windows)
    peaks = [w["peak_memory_mb"] for w in windows if "peak_memory_mb" in w]
    return {
        "method": method.label,
        "seed": seed,
        "ppl": float(np.exp(nll / tokens)),
        "tokens_scored": tokens,
        "windows": windows,
        **{k: float(np.mean([w[k] for w in windows])) for k in (
            "cache_bytes", "bits_per_value_quantized", "bits_per_value_all_in", "bits_per_value_all_in_fp16",
            "avg_cache_tokens", "final_cache_tokens")},
        "peak_cache_bytes": max(w["peak_cache_bytes"] for w in windows),
        **({"peak_memory_mb": max(peaks)} if peaks else {}),
        "wall_time_s": wall,
        "tokens_per_s": (cfg.context_length - cfg.prefill) * len(starts) / wall,
    }
