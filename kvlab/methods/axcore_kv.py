"""``axcore-kv4``: AxCore's FP4 KV cache with approximate-multiply attention.

Keys: FP4 (E2M1 for Llama-style models) per token, one fp16 scale per group of ``key_group``
head channels. Values: FP4 E3M0 per channel, one fp16 scale per group of ``value_group``
tokens. Attention runs in :func:`kvlab.approx.attention.approx_attention` (fp16 x fp16
approximate multiply with +C for Q K^T and P V, fp16 accumulation per group, exact softmax).

``mode="decode"`` is a real cache: a token's keys are quantized as soon as they arrive (per
token, nothing to wait for), values when their ``value_group``-token group is complete; the
partial group stays fp16. Codes are packed two per byte (keys along channels, values along
tokens). Quantization happens in ``update``, before the step's attention, so a forward over
a whole sequence sees what the artifact's fake quantization gives wherever the value groups
are complete.

``mode="artifact"``: the artifact's evaluation, whole-sequence fake quantization. The layer
keeps fp16 keys and values and quantizes all of them at every call, the trailing partial
value group included (its scales from the tokens present); memory is what it holds: fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.approx.attention import approx_attention
from kvlab.approx.formats import FORMAT_BY_NAME, FP4Format, decode, group_scales, quantize_codes
from kvlab.attention import mark_pending
from kvlab.cache import PackedStore, StoredLayer, _cat
from kvlab.methods.base import Method, register
from kvlab.quant.packing import pack, unpack

MODES = ("decode", "artifact")


def quantize_last(x: torch.Tensor, fmt: FP4Format, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 codes ``[..., n]`` and fp16 scales ``[..., ceil(n / group)]`` of ``x``, grouped along the last dim."""
    flat = x.reshape(-1, x.shape[-1])
    scales = group_scales(flat, fmt, group)
    codes = quantize_codes(flat, scales, fmt, group)
    return codes.view(x.shape), scales.view(*x.shape[:-1], -1)


def dequantize_last(codes: torch.Tensor, scales: torch.Tensor, fmt: FP4Format, group: int) -> torch.Tensor:
    """fp16 ``code value x scale`` (one rounding), inverse layout of :func:`quantize_last`."""
    s = scales.float().repeat_interleave(group, dim=-1)[..., : codes.shape[-1]]
    return (decode(codes, fmt) * s).to(torch.float16)


@dataclass(frozen=True)
class KeyTokenCodec:
    """Keys ``[B, H, T, D]`` per token: codes packed along channels, ``scale [B, H, T, D / group]``."""

    fmt: FP4Format
    group: int

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = quantize_last(x, self.fmt, self.group)
        return {"codes": pack(codes, 4, dim=-1), "scale": scale}

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_last(unpack(fields["codes"], 4, dim=-1), fields["scale"], self.fmt, self.group)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_last(*quantize_last(x, self.fmt, self.group), self.fmt, self.group)


@dataclass(frozen=True)
class ValueChannelCodec:
    """Values ``[B, H, T, D]`` per channel over groups of ``group`` tokens: codes packed along
    tokens ``[B, H, T / 2, D]``, ``scale [B, H, T / group, D]``."""

    fmt: FP4Format
    group: int

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = quantize_last(x.transpose(2, 3), self.fmt, self.group)
        return {"codes": pack(codes.transpose(2, 3), 4, dim=2), "scale": scale.transpose(2, 3).contiguous()}

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = unpack(fields["codes"], 4, dim=2).transpose(2, 3)
        return dequantize_last(codes, fields["scale"].transpose(2, 3), self.fmt, self.group).transpose(2, 3)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.transpose(2, 3)
        return dequantize_last(*quantize_last(xt, self.fmt, self.group), self.fmt, self.group).transpose(2, 3)


class AxCoreKVLayer(StoredLayer):
    """One attention layer's FP4 cache; ``attend`` computes attention with approximate products."""

    is_croppable = False

    def __init__(self, keys: KeyTokenCodec, values: ValueChannelCodec, artifact: bool, layer_idx: int = 0):
        super().__init__()
        self.key_codec, self.value_codec = keys, values
        self.artifact, self.layer_idx = artifact, layer_idx
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None  # artifact mode: fp16 keys and values
        self.key_store, self.value_store = PackedStore(), PackedStore()
        self.value_tail: torch.Tensor | None = None  # decode mode: the incomplete value group
        self.length = 0
        self.is_initialized = False

    def _apply(self, fn) -> None:
        self._apply_to(("keys", "values", "value_tail"), fn)
        self.key_store.apply(fn)
        self.value_store.apply(fn)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new tokens; returns the keys and values attention sees (dequantized)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[2]
        mark_pending(self)
        if self.artifact:
            self.keys = _cat(self.keys, key_states.to(torch.float16))
            self.values = _cat(self.values, value_states.to(torch.float16))
            return self.key_codec.fake(self.keys).to(self.dtype), self.value_codec.fake(self.values).to(self.dtype)
        self.key_store.append(self.key_codec.encode(key_states.to(torch.float16)), key_states.shape[2])
        self.value_tail = _cat(self.value_tail, value_states.to(torch.float16))
        full = self.value_tail.shape[2] // self.value_codec.group * self.value_codec.group
        if full:
            self.value_store.append(self.value_codec.encode(self.value_tail[:, :, :full]), full)
            self.value_tail = self.value_tail[:, :, full:]
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.key_codec.decode(self.key_store.fields)
        parts = [self.value_codec.decode(self.value_store.fields)] if self.value_store.tokens else []
        values = torch.cat(parts + [self.value_tail], dim=2)
        return keys.to(self.dtype), values.to(self.dtype)

    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        """``key``/``value`` are what ``update`` returned: the cache as attention sees it."""
        return approx_attention(query, key, value, attention_mask, scaling)

    # -- accounting ----------------------------------------------------------------------

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.keys, self.values) if self.artifact else (self.value_tail,)


@register("axcore-kv4")
@dataclass(frozen=True)
class AxCoreKV(Method):
    key_format: str = "e2m1"
    value_format: str = "e3m0"
    key_group: int = 64
    value_group: int = 64
    mode: str = "decode"

    needs_kvlab_attention: ClassVar[bool] = True

    def validate(self) -> None:
        for name in ("key_format", "value_format"):
            if getattr(self, name) not in FORMAT_BY_NAME:
                raise ValueError(f"{self.label}: {name}={getattr(self, name)} is not one of {sorted(FORMAT_BY_NAME)}")
        for name in ("key_group", "value_group"):
            if getattr(self, name) < 2 or getattr(self, name) % 2:
                raise ValueError(f"{self.label}: {name}={getattr(self, name)} must be a positive even number")
        if self.mode not in MODES:
            raise ValueError(f"{self.label}: mode={self.mode} is not one of {MODES}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.key_group:
            raise ValueError(f"{self.label}: key groups of {self.key_group} channels do not tile head_dim={head_dim}")

    def make_layer(self, layer_idx: int, head_dim: int) -> AxCoreKVLayer:
        keys = KeyTokenCodec(FORMAT_BY_NAME[self.key_format], self.key_group)
        values = ValueChannelCodec(FORMAT_BY_NAME[self.value_format], self.value_group)
        return AxCoreKVLayer(keys, values, self.mode == "artifact", layer_idx)

    def bits_per_value(self, head_dim: int) -> float:
        if self.mode == "artifact":
            return 16.0  # fake quantization: the layer holds fp16
        return 4 + (16 / self.key_group + 16 / self.value_group) / 2

    def all_in_bits(self, length: int, head_dim: int) -> float:
        if self.mode == "artifact":
            return 16.0
        tail = length % self.value_group  # values still in fp16
        value_bits = (16 * tail + (4 + 16 / self.value_group) * (length - tail)) / length
        return (4 + 16 / self.key_group + value_bits) / 2
