"""Eviction composed with quantization (``h2o+kitty-pro``): the evicting policy decides which
tokens each head keeps, the quantization method stores them.

The layer is the quantized cache (:class:`~kvlab.cache.QuantizedLayer`: fp16 sinks, quantized
keys/values, fp16 residual tail) with eviction on top. After each attention pass, the tokens that
left the residual window are quantized (whole key blocks and value blocks, as in the plain
quantized layer), then the policy evicts; the quantization method's sinks and residual tail are
always kept and count toward the budget, so every head has the same fp16/quantized split and only
quantized tokens are ever evicted. Each token is quantized once; eviction gathers the codes of the
kept tokens, so the store holds codes of kept tokens only.

Key codes are quantized per channel over blocks of G tokens. After eviction a block is ragged
(each head keeps its own tokens of it), so the key store holds codes per token, packed along
channels, with the index of the block whose scale/zero (and boosted channels) decode them. Value
codes are per token anyway; their store repacks them along channels too, so eviction gathers tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.cache import PackedStore, QuantizedLayer
from kvlab.eviction import EvictionMethod, EvictionMixin
from kvlab.methods.base import Method
from kvlab.quant.codecs import Fields, KeyChannelCodec, ValueTokenCodec
from kvlab.quant.packing import pack, unpack
from kvlab.quant.uniform import dequantize


def _pack_channels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    pad = -codes.shape[-1] % (8 // bits)
    return pack(torch.nn.functional.pad(codes, (0, pad)), bits, dim=3)


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(2, idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:]))


class TokenStore(PackedStore):
    """Per-token fields: eviction gathers along dim 2."""

    def gather(self, idx: torch.Tensor) -> None:
        self.fields = {name: _gather_tokens(t, idx) for name, t in self.fields.items()}
        self.tokens = idx.shape[2]


class ValueTokenStore(TokenStore):
    """The value codec's fields with codes repacked per token (``codes [B, H, T, D * bits / 8]``)."""

    def __init__(self, codec: ValueTokenCodec) -> None:
        super().__init__()
        self.codec = codec

    def append(self, fields: Fields, tokens: int) -> None:
        codes = _pack_channels(self.codec.codes(fields), self.codec.bits)
        super().append({**fields, "codes": codes}, tokens)

    def decode(self, codec: ValueTokenCodec, dtype: torch.dtype) -> torch.Tensor:
        return codec.dequantize(unpack(self.fields["codes"], codec.bits, dim=3), self.fields, dtype)


class RaggedKeyStore(TokenStore):
    """Key codes per token (``lo``, ``hi`` packed along channels; ``block``: their block's index)
    and per-block tables (``scale``, ``zero``, ``idx``) that eviction leaves in place."""

    TABLES = ("scale", "zero", "idx")

    def __init__(self, codec: KeyChannelCodec) -> None:
        super().__init__()
        self.codec = codec

    def append(self, fields: Fields, tokens: int) -> None:
        c = self.codec
        B, H = fields["scale"].shape[:2]
        first_block = self.fields["scale"].shape[2] if "scale" in self.fields else 0
        block = torch.arange(first_block, first_block + tokens // c.group_size, device=fields["scale"].device)
        per_token: Fields = {
            "lo": _pack_channels(unpack(fields["lo"], c.bits, dim=2), c.bits),
            "block": block.repeat_interleave(c.group_size).to(torch.int32).expand(B, H, tokens),
        }
        if c.boost_channels:
            per_token["hi"] = _pack_channels(unpack(fields["hi"], c.boost_bits - c.bits, dim=2), c.boost_bits - c.bits)
        super().append({**per_token, **{k: fields[k] for k in self.TABLES if k in fields}}, tokens)

    def gather(self, idx: torch.Tensor) -> None:
        self.fields = {name: t if name in self.TABLES else _gather_tokens(t, idx) for name, t in self.fields.items()}
        self.tokens = idx.shape[2]

    def decode(self, codec: KeyChannelCodec, dtype: torch.dtype) -> torch.Tensor:
        f = self.fields
        scale = f["scale"]
        D = scale.shape[-1]
        codes = unpack(f["lo"], codec.bits, dim=3)[..., :D]
        block = f["block"].long()
        if codec.boost_channels:
            nb = codec.boost_channels
            hi = unpack(f["hi"], codec.boost_bits - codec.bits, dim=3)[..., :nb]
            channels = _gather_tokens(f["idx"], block).long()
            codes = codes.scatter_add(-1, channels, hi << codec.bits)
        return dequantize(codes, _gather_tokens(scale, block), _gather_tokens(f["zero"], block), dtype)


class QuantizedEvictionLayer(EvictionMixin, QuantizedLayer):
    is_croppable = False

    def __init__(self, method: EvictionMethod, key_codec: KeyChannelCodec, value_codec: ValueTokenCodec,
                 residual: int, sinks: int, layer_idx: int = 0):
        self.method = method
        super().__init__(key_codec, value_codec, residual, sinks, layer_idx)

    def _clear(self) -> None:
        super()._clear()
        self.key_store, self.value_store = RaggedKeyStore(self.key_codec), ValueTokenStore(self.value_codec)
        self._reset_eviction()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._track(key_states)
        return super().update(key_states, value_states)

    def _decoded(self, store: TokenStore, codec, dtype: torch.dtype, rows: slice) -> torch.Tensor | None:
        return store.decode(codec, dtype)[rows] if store.tokens else None

    def _before_eviction(self) -> None:
        self._flush()

    def _lengths(self) -> tuple[int, int, int]:
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        tails = [0 if t is None else t.shape[2] for t in (self.key_tail, self.value_tail)]
        return sinks, tails[0], tails[1]

    def _kept(self) -> int:
        sinks, key_tail, _ = self._lengths()
        return sinks + self.key_store.tokens + key_tail

    def _protect(self, n: int) -> torch.Tensor:
        sinks, key_tail, value_tail = self._lengths()
        entry = torch.arange(n)
        return (entry < sinks) | (entry >= n - max(key_tail, value_tail))

    def _keep(self, idx: torch.Tensor) -> None:
        # Sinks and tails are protected, so the kept entries of each store are a contiguous slice of idx.
        sinks, key_tail, value_tail = self._lengths()
        k = idx.shape[2]
        self.key_store.gather(idx[:, :, sinks : k - key_tail] - sinks)
        self.value_store.gather(idx[:, :, sinks : k - value_tail] - sinks)

    def _apply(self, fn) -> None:
        super()._apply(fn)
        self._apply_to(("scores", "positions", "valid", "row_offset"), fn)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.eviction_bytes()


@dataclass(frozen=True)
class Composed(Method):
    """``eviction+quantization``: built by :func:`kvlab.methods.parse_method` from ``a+b``."""

    eviction: EvictionMethod
    quant: Method

    name: ClassVar[str] = "composed"
    needs_kvlab_attention: ClassVar[bool] = True

    def validate(self) -> None:
        if not isinstance(self.eviction, EvictionMethod):
            raise ValueError(f"{self.label}: {self.eviction.label!r} is not an eviction method")
        if not all(hasattr(self.quant, a) for a in ("key_codec", "value_codec", "residual", "sinks")):
            raise ValueError(f"{self.label}: {self.quant.label!r} is not a KIVI-family quantization method")

    def make_layer(self, layer_idx: int, head_dim: int) -> QuantizedEvictionLayer:
        q = self.quant
        return QuantizedEvictionLayer(self.eviction, q.key_codec(head_dim), q.value_codec(head_dim),
                                      q.residual, q.sinks, layer_idx)

    def check_head_dim(self, head_dim: int) -> None:
        self.quant.check_head_dim(head_dim)

    def bits_per_value(self, head_dim: int) -> float:
        return self.quant.bits_per_value(head_dim)

    def full_precision_tokens(self, length: int) -> int:
        return self.quant.full_precision_tokens(length)

    def params(self) -> dict[str, Any]:
        return {"eviction": self.eviction.label, "quant": self.quant.label}

    def with_budget(self, sparsity: float | None = None, budget: int | None = None) -> "Composed":
        return Composed(self.eviction.with_budget(sparsity, budget), self.quant)

    @property
    def budget_tag(self) -> str:
        return self.eviction.budget_tag

    @property
    def base_label(self) -> str:
        return f"{self.eviction.base_label}+{self.quant.label}"

    @property
    def label(self) -> str:
        return f"{self.eviction.label}+{self.quant.label}"
