"""Static decoding: a prefilled cache frozen at fixed addresses, for CUDA-graph replay.

A CUDA graph replays recorded kernel launches with their arguments, so nothing a decode step
touches may move or change shape, and no length may be a Python number. :func:`make_static`
turns a prefilled :class:`~kvlab.cache.CompressedCache` into such a cache:

* every buffer is allocated for the whole generation (packed stores at their capacity, fp16
  tails as rings of ``residual + G`` tokens for keys and ``residual + G + block`` for values,
  dense layers as ``[B, H, capacity, D]``);
* the lengths of every step are computed once, on the host, into a small per-layer schedule
  ``meta [steps, 8]`` on the device (the columns ``META_*`` of :mod:`kvlab.kernels.decode_attention`);
  kernels read row ``step`` (a device counter that the step itself increments);
* the schedule replays the reference cache's rule exactly: before a token is appended, a key
  block of ``G`` tokens is quantized when the key tail exceeds ``residual``, a value block (the
  value codec's ``block_tokens``) when the value tail exceeds it by a block. The quantized
  layer's codes, and so its attention, equal those of the dynamic
  :class:`~kvlab.cache.QuantizedLayer` fed the same tokens (tested).

Supported layers: fused quantized layers (kivi, kivi*, kitty, kitty-pro on CUDA) and full-precision
layers (fp16). Other methods decode with the dynamic cache (:func:`static_reason` says why).
"""

from __future__ import annotations

from typing import Any

import torch

from kvlab.attention import enable as enable_kvlab_attention
from kvlab.cache import CompressedCache, CompressedLayer, FullPrecisionLayer, QuantizedLayer, StoredLayer
from kvlab.kernels.decode_attention import META_COLS, kernel_unsupported, static_attend
from kvlab.kernels.static_cache import dense_append, dense_attend, static_update


def quantized_schedule(S: int, Tk: int, Tv: int, Rk: int, residual: int, group: int, value_block: int,
                       steps: int) -> list[list[int]]:
    """Rows ``[S, Tk, Tv, Rk, key_flush, value_flush, 0, 0]`` of the decode steps after a settled prefill.

    ``Tk``/``Tv``: quantized key/value tokens (sinks excluded), ``Rk`` the key tail with the step's
    token; the value tail is ``Tk + Rk - Tv``. Follows ``QuantizedLayer._flush`` then append.
    """
    rows = []
    Rv = Tk + Rk - Tv
    for _ in range(steps):
        kf = int(Rk > residual)
        if kf:
            Tk, Rk = Tk + group, Rk - group
        vf = int(Rv - residual >= value_block)
        if vf:
            Tv, Rv = Tv + value_block, Rv - value_block
        Rk, Rv = Rk + 1, Rv + 1
        rows.append([S, Tk, Tv, Rk, kf, vf, 0, 0])
    return rows


def static_reason(cache) -> str | None:
    """Why ``cache`` has no static (CUDA-graph) decode path, or None."""
    if not isinstance(cache, CompressedCache):
        return "not a kvlab cache"
    for layer in cache.layers:
        if isinstance(layer, QuantizedLayer):
            if not layer.fused:
                return "quantized layers decode with CUDA kernels only (fused=True on a CUDA model)"
            G = layer.key_codec.group_size
            reason = kernel_unsupported(layer.device, layer.dtype, cache.head_dim, layer.key_codec, layer.value_codec)
            if reason is None and G & (G - 1):
                reason = f"key group {G} is not a power of two"
            if reason is None and layer.length < layer.sinks:
                reason = f"the prompt ({layer.length} tokens) is shorter than the {layer.sinks} sinks"
        elif type(layer) is FullPrecisionLayer:
            reason = kernel_unsupported(layer.keys.device, layer.keys.dtype, cache.head_dim)
        else:
            reason = f"{type(layer).__name__} has no static decode path"
        if reason:
            return reason
    return None


class _StaticLayer(CompressedLayer):
    """Shared by the static layers: the schedule, the step counter, the attendable positions."""

    fused = True  # attention runs in kvlab's attention implementation

    def __init__(self, rows: list[list[int]], step: torch.Tensor, valid: torch.Tensor | None, layer_idx: int,
                 length: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.host_rows = rows
        self.meta = torch.tensor(rows, dtype=torch.int32, device=step.device).view(-1, META_COLS)
        self.step, self.valid = step, valid
        self.length = length
        self.is_initialized = True

    def finish(self, steps_done: int) -> None:
        """Bring host-side lengths up to date after ``steps_done`` replayed steps (graphs skip Python)."""
        if steps_done:
            S, Tk, _, Rk = self.host_rows[steps_done - 1][:4]
            self.length = S + Tk + Rk

    def update(self, *args: Any, **kwargs: Any):
        raise RuntimeError("a static cache decodes only inside kvlab.generate's StaticDecoder steps")

    def _clear(self) -> None:
        raise RuntimeError("a static cache is made for one generation; make a new cache")

    def _apply(self, fn) -> None:
        raise RuntimeError("a static cache has a fixed batch (no beam search or batch reordering)")


class StaticQuantizedLayer(_StaticLayer, StoredLayer):
    def __init__(self, layer: QuantizedLayer, steps: int, step: torch.Tensor, valid: torch.Tensor | None):
        layer._flush()  # what the next update would do first: key tail <= R, value tail < R + its block
        kc, G, R = layer.key_codec, layer.key_codec.group_size, layer.residual
        S = 0 if layer.sink_keys is None else layer.sink_keys.shape[2]
        Tk, Tv = layer.key_store.tokens, layer.value_store.tokens
        Rk = 0 if layer.key_tail is None else layer.key_tail.shape[2]
        VB = layer.value_codec.block_tokens
        rows = quantized_schedule(S, Tk, Tv, Rk, R, G, VB, steps)
        needed = rows[-1][1] if rows else Tk
        if layer.key_store.capacity % G or needed > layer.key_store.capacity:
            raise ValueError(f"the cache's capacity {layer.key_store.capacity} must be a multiple of {G} covering "
                             f"{needed} quantized tokens")
        super().__init__(rows, step, valid, layer.layer_idx, layer.length)
        self.key_codec, self.value_codec = kc, layer.value_codec
        self.sink_keys, self.sink_values = layer.sink_keys, layer.sink_values
        self.key_store, self.value_store = layer.key_store, layer.value_store
        like = layer.key_tail if layer.key_tail is not None else layer.sink_keys
        B, H, _, D = like.shape
        zeros = like.new_zeros(B, H, max(G, VB), D)
        encode_keys, encode_values = layer._encoders()
        self.key_store.allocate(encode_keys(zeros[:, :, :G]), G)  # no-ops where the prefill allocated them
        self.value_store.allocate(encode_values(zeros[:, :, :VB]), VB)
        # Tails during attention: keys R + 2 - G .. R + 1 tokens, values R + 1 .. R + VB; a step's new token
        # must not take the slot of a block it flushes.
        self.key_ring = like.new_zeros(B, H, R + G, D)
        self.value_ring = like.new_zeros(B, H, R + G + VB, D)
        for ring, tail, first in ((self.key_ring, layer.key_tail, Tk), (self.value_ring, layer.value_tail, Tv)):
            if tail is not None and tail.shape[2]:
                slots = (first + torch.arange(tail.shape[2], device=tail.device)) % ring.shape[2]
                ring[:, :, slots] = tail

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        static_update(self, key, value, self.step, self.meta)

    def attend_step(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        return static_attend(self, query, self.valid, scaling, self.step, self.meta)

    def finish(self, steps_done: int) -> None:
        super().finish(steps_done)
        if steps_done:
            _, Tk, Tv = self.host_rows[steps_done - 1][:3]
            self.key_store.resize(Tk)
            self.value_store.resize(Tv)

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.sink_keys, self.sink_values, self.key_ring, self.value_ring


class StaticDenseLayer(_StaticLayer):
    def __init__(self, layer: FullPrecisionLayer, steps: int, step: torch.Tensor, valid: torch.Tensor | None,
                 layer_idx: int):
        B, H, P, D = layer.keys.shape
        rows = [[0, 0, 0, P + s + 1, 0, 0, 0, 0] for s in range(steps)]
        super().__init__(rows, step, valid, layer_idx, P)
        if layer.preallocated() and layer.capacity >= P + steps:
            self.keys, self.values = layer.buffers  # preallocated by make_cache: decode in place
        else:
            self.keys = layer.keys.new_empty(B, H, P + steps, D)
            self.values = layer.values.new_empty(B, H, P + steps, D)
            self.keys[:, :, :P] = layer.keys
            self.values[:, :, :P] = layer.values

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        dense_append(self.keys, self.values, key, value, self.step, self.meta)

    def attend_step(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        return dense_attend(query, self.keys, self.values, self.valid, scaling, self.step, self.meta)

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.keys, self.values

    def memory_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def make_static(cache: CompressedCache, model, steps: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Freeze a prefilled cache for ``steps`` decode steps; returns the step counter (int32 ``[1]``)
    that the decode step must increment after each forward. ``attention_mask [B, prompt]`` (left
    padding) marks which prompt positions may be attended."""
    reason = static_reason(cache)
    if reason:
        raise ValueError(f"no static decode path: {reason}")
    device = next(model.parameters()).device
    step = torch.zeros(1, dtype=torch.int32, device=device)
    valid = None
    if attention_mask is not None and not bool(attention_mask.all()):
        B, P = attention_mask.shape
        valid = torch.ones(B, P + steps, dtype=torch.bool, device=device)
        valid[:, :P] = attention_mask.bool()
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, QuantizedLayer):
            cache.layers[i] = StaticQuantizedLayer(layer, steps, step, valid)
        else:
            cache.layers[i] = StaticDenseLayer(layer, steps, step, valid, i)
    enable_kvlab_attention(model)
    return step
