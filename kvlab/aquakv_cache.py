"""AQUA-KV's cache layer: sinks, an fp16 buffer, and write-once HIGGS blocks.

Per layer, in token order::

    [ prefix (sinks, model dtype) | compressed blocks (packed codes + fp16 scales) | buffer (model dtype) ]

New tokens wait in the buffer. At the start of an ``update`` that finds ``>= buffer_size`` tokens
there, the whole buffer becomes one compressed block (so the step that appended a token attends to
it in full precision, as in kvlab's other caches and AQUA-KV's reference). Every token is
compressed exactly once and never re-coded; nothing dequantized is kept between calls.

A :class:`BlockCodec` codes the blocks. :class:`HiggsBlockCodec` codes every layer on its own.
:class:`PredictorBlockCodec` is AQUA-KV: layer ``l`` is predicted from layer ``l - 1``'s
reconstruction of the same tokens and only the residual is coded, on pre-RoPE keys. Since
transformers updates the layers in order within one forward, layer ``l - 1`` has already
decoded (and, on a write step, encoded) every block when layer ``l`` runs: it leaves its
per-block reconstructions in a :class:`CrossLayerHandoff` shared by the layers of one cache,
and layer ``l`` takes them. Encoder and decoder use the same row blocks, so the decoder
recomputes the encoder's closed-loop reconstruction with the same operations on the same
shapes (bit-exact on CPU).

Keys are cached post-RoPE by transformers. The predictor codec rotates them back to pre-RoPE
with the cos/sin of their positions (the cache index: sinks at 0.., blocks after them), and
re-applies RoPE after decoding. Plain HIGGS codes post-RoPE keys: RoPE rotates pairs of
channels within a head, so with Hadamard groups of whole heads it does not change the
group norms the quantizer sees.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch

from kvlab.cache import CompressedLayer
from kvlab.quant.higgs import HiggsCodes, HiggsQuantizer
from kvlab.quant.predictors import CrossLayerPredictors, LayerCodes, LayerKV


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """Llama-style rotary embedding (``rotate_half`` pairs), from the model's ``inv_freq`` and attention scaling."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_model(cls, model) -> Rope:
        """The model's rotary embedding module (``model.model.rotary_emb`` for Llama-like models)."""
        for module in model.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
                if getattr(module, "rope_type", "default") in ("dynamic", "longrope"):
                    raise ValueError(f"RoPE type {module.rope_type!r} changes with the sequence length; "
                                     "aqua-kv supports static RoPE only")
                return cls(module.inv_freq.detach().cpu(), module.attention_scaling)
        raise ValueError("the model has no rotary embedding module (a module with inv_freq and attention_scaling)")

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of float32 ``x`` [..., tokens, head_dim] at ``positions`` [tokens], as the model applies it."""
        cos, sin = self._cos_sin(positions)
        return (x * cos + _rotate_half(x) * sin) * self.attention_scaling

    def remove(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: rotate back by the same angles and undo the scaling."""
        cos, sin = self._cos_sin(positions)
        return (x * cos - _rotate_half(x) * sin) / self.attention_scaling


class BlockCodec(Protocol):
    """Codes one layer's block of keys/values [batch, tokens, C] (C = kv_heads * head_dim, head-major)."""

    cross_layer: bool  # True: layer l needs layer l - 1's reconstruction (``prev``) of the same tokens
    rope: Rope | None  # keys are coded pre-RoPE when set

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               prev: LayerKV | None) -> LayerCodes: ...

    def decode(self, layer: int, codes: LayerCodes, prev: LayerKV | None) -> LayerKV: ...

    def check_width(self, width: int) -> None:
        """Raise ValueError if rows of ``width`` = kv_heads * head_dim channels cannot be coded."""


class HiggsBlockCodec:
    """Plain HIGGS: every layer coded on its own with one quantizer."""

    cross_layer = False
    rope = None

    def __init__(self, quantizer: HiggsQuantizer) -> None:
        self.quantizer = quantizer
        self._moved: dict[torch.device, HiggsQuantizer] = {}

    def _on(self, device: torch.device) -> HiggsQuantizer:
        if device not in self._moved:
            q = self.quantizer
            self._moved[device] = HiggsQuantizer(q.d, q.n, q.group_size, grid=q.grid.to(device))
        return self._moved[device]

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, prev: LayerKV | None) -> LayerCodes:
        q = self._on(keys.device)
        return LayerCodes(q.quantize(keys), q.quantize(values))

    def decode(self, layer: int, codes: LayerCodes, prev: LayerKV | None) -> LayerKV:
        q = self._on(codes.keys.codes.device)
        return LayerKV(q.dequantize(codes.keys), q.dequantize(codes.values))

    def check_width(self, width: int) -> None:
        if width % self.quantizer.group_size:
            raise ValueError(f"higgs: kv_heads * head_dim = {width} is not a multiple of the Hadamard group size "
                             f"{self.quantizer.group_size}; set hadamard_groupsize to a power of two dividing {width}")


class PredictorBlockCodec:
    """AQUA-KV: cross-layer predictors plus HIGGS-coded residuals, on pre-RoPE keys."""

    cross_layer = True

    def __init__(self, predictors: CrossLayerPredictors, rope: Rope, source: str = "predictors") -> None:
        self.predictors, self.rope, self.source = predictors, rope, source
        self._moved: dict[torch.device, CrossLayerPredictors] = {}

    def _on(self, device: torch.device) -> CrossLayerPredictors:
        if device not in self._moved:  # one copy of the weights per device, shared by all layers and caches
            self._moved[device] = self.predictors.to(device)
        return self._moved[device]

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, prev: LayerKV | None) -> LayerCodes:
        return self._on(keys.device).encode_layer(layer, keys, values, prev)[0]

    def decode(self, layer: int, codes: LayerCodes, prev: LayerKV | None) -> LayerKV:
        return self._on(codes.keys.codes.device).decode_layer(layer, codes, prev)

    def bits_per_value(self, layer: int) -> float:
        p = self.predictors
        return (p.first_layer_quantizer if layer == 0 else p.quantizer).bits_per_value

    def describe(self) -> str:
        p = self.predictors
        return f"{p.model_id} ({p.num_layers} layers, {p.kv_heads} KV heads x head_dim {p.head_dim})"

    def check_width(self, width: int) -> None:
        if width != self.predictors.width:
            raise ValueError(f"aqua-kv: {self.source} was calibrated for {self.describe()}, C = "
                             f"{self.predictors.width}; this model has C = kv_heads * head_dim = {width}")

    def new_handoff(self) -> CrossLayerHandoff:
        return CrossLayerHandoff(self.predictors.num_layers, f"{self.source} was calibrated for {self.describe()}")


class CrossLayerHandoff:
    """Layer ``l - 1``'s reconstruction of every block, left for layer ``l`` within one forward.

    Shared by the layers of one cache. It holds one layer's reconstructions at a time (a
    transient working set, like the dequantized tensors handed to attention).
    """

    def __init__(self, num_layers: int, origin: str) -> None:
        self.num_layers, self.origin = num_layers, origin
        self.members = 0  # layers 0..members-1 joined, in order
        self.layer = -1
        self.blocks: list[LayerKV] = []

    def join(self, layer: int) -> None:
        """Called once per layer as the cache is built; layers must be 0, 1, 2, ... and fit the predictors."""
        if layer != self.members:
            raise ValueError(f"aqua-kv: layer {layer} joined a cross-layer cache after layer {self.members - 1}; "
                             "every layer from 0 on must be a full-attention layer")
        if layer >= self.num_layers:
            raise ValueError(f"aqua-kv: {self.origin}; this model has more layers")
        self.members += 1

    def check_complete(self) -> None:
        if self.members != self.num_layers:
            raise ValueError(f"aqua-kv: {self.origin}; this model has {self.members} full-attention layers")

    def put(self, layer: int, blocks: list[LayerKV]) -> None:
        self.layer, self.blocks = layer, blocks

    def take(self, layer: int, num_blocks: int) -> list[LayerKV]:
        if layer == 0:
            return []
        if self.layer != layer - 1 or len(self.blocks) != num_blocks:
            raise RuntimeError(
                f"aqua-kv: layer {layer} needs layer {layer - 1}'s reconstruction of {num_blocks} blocks, "
                f"but the last layer to update was {self.layer} with {len(self.blocks)}; the layers of a "
                "cross-layer cache must all be aqua-kv layers, updated in order within each forward")
        return self.blocks


class Block(NamedTuple):
    """One write-once compressed block: codes for ``length`` tokens from cache position ``start``."""

    start: int
    length: int
    codes: LayerCodes


def _map_codes(codes: LayerCodes, fn) -> LayerCodes:
    return LayerCodes(*(HiggsCodes(fn(c.codes), fn(c.scales)) for c in codes))


class BufferedBlockLayer(CompressedLayer):
    """One attention layer of an AQUA-KV / HIGGS cache (see the module docstring)."""

    is_croppable = True

    def __init__(self, codec: BlockCodec, prefix_size: int, buffer_size: int, layer_idx: int,
                 handoff: CrossLayerHandoff | None = None) -> None:
        if codec.cross_layer and handoff is None:
            raise ValueError("a cross-layer codec needs the cache's shared CrossLayerHandoff")
        if handoff is not None:
            handoff.join(layer_idx)
        super().__init__()
        self.codec, self.handoff = codec, handoff
        self.prefix_size, self.buffer_size, self.layer_idx = prefix_size, buffer_size, layer_idx
        self._clear()

    def _clear(self) -> None:
        self.sink_keys = self.sink_values = None
        self.key_tail = self.value_tail = None  # the buffer (names shared with kvlab's QuantizedLayer)
        self.blocks: list[Block] = []
        self.length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.heads, self.head_dim = key_states.shape[1], key_states.shape[3]
        self.codec.check_width(self.heads * self.head_dim)
        if self.handoff is not None:
            self.handoff.check_complete()
        self.key_tail, self.value_tail = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    # -- layout: [B, H, T, D] (attention) <-> [B, T, C] (codec rows) ---------------------

    def _positions(self, start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, device=self.device)

    def _to_rows(self, x: torch.Tensor, start: int, is_key: bool) -> torch.Tensor:
        x = x.float()
        if is_key and self.codec.rope is not None:
            x = self.codec.rope.remove(x, self._positions(start, x.shape[2]))
        return x.transpose(1, 2).flatten(2)

    def _from_rows(self, rows: torch.Tensor, start: int, is_key: bool) -> torch.Tensor:
        x = rows.unflatten(2, (self.heads, self.head_dim)).transpose(1, 2)
        if is_key and self.codec.rope is not None:
            x = self.codec.rope.apply(x, self._positions(start, x.shape[2]))
        return x.to(self.dtype)

    # -- the algorithm ---------------------------------------------------------------------

    def _flush(self) -> None:
        """Compress the whole buffer into one block once it holds ``>= buffer_size`` tokens."""
        n = self.key_tail.shape[2]
        if n < self.buffer_size:
            return
        start = self.prefix_size + sum(b.length for b in self.blocks)
        prev = None
        if self.codec.cross_layer and self.layer_idx > 0:  # layer l - 1 already holds this block
            prev = self.handoff.take(self.layer_idx, len(self.blocks) + 1)[-1]
        codes = self.codec.encode(self.layer_idx, self._to_rows(self.key_tail, start, True),
                                  self._to_rows(self.value_tail, start, False), prev)
        self.blocks.append(Block(start, n, codes))
        self.key_tail, self.value_tail = self.key_tail[:, :, n:], self.value_tail[:, :, n:]

    def _decode_blocks(self) -> list[LayerKV]:
        """Reconstruct every block (pre-RoPE rows), block by block as they were encoded."""
        prevs: list[LayerKV | None] = [None] * len(self.blocks)
        if self.codec.cross_layer and self.layer_idx > 0:
            prevs = list(self.handoff.take(self.layer_idx, len(self.blocks)))
        recs = [self.codec.decode(self.layer_idx, b.codes, prev) for b, prev in zip(self.blocks, prevs)]
        if self.codec.cross_layer:
            self.handoff.put(self.layer_idx, recs)
        return recs

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        n_sink = max(0, min(self.prefix_size - self.length, key_states.shape[2]))
        if n_sink:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :n_sink])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :n_sink])
        self.key_tail = torch.cat([self.key_tail, key_states[:, :, n_sink:]], dim=2)
        self.value_tail = torch.cat([self.value_tail, value_states[:, :, n_sink:]], dim=2)
        self.length += key_states.shape[2]
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as attention sees them: [sinks | decoded blocks | buffer], post-RoPE."""
        keys, values = [self.sink_keys], [self.sink_values]
        for block, rec in zip(self.blocks, self._decode_blocks()):
            keys.append(self._from_rows(rec.keys, block.start, True))
            values.append(self._from_rows(rec.values, block.start, False))
        keys.append(self.key_tail)
        values.append(self.value_tail)
        return (torch.cat([t for t in keys if t is not None], dim=2),
                torch.cat([t for t in values if t is not None], dim=2))

    def _apply(self, fn) -> None:
        self._apply_to(("sink_keys", "sink_values", "key_tail", "value_tail"), fn)
        self.blocks = [Block(b.start, b.length, _map_codes(b.codes, fn)) for b in self.blocks]

    # -- accounting ----------------------------------------------------------------------------

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.sink_keys, self.sink_values, self.key_tail, self.value_tail

    def quantized_tokens(self) -> tuple[int, int]:
        n = sum(b.length for b in self.blocks)
        return n, n

    def quantized_bytes(self) -> tuple[int, int]:
        keys = sum(_nbytes(b.codes.keys.codes) + _nbytes(b.codes.keys.scales) for b in self.blocks)
        values = sum(_nbytes(b.codes.values.codes) + _nbytes(b.codes.values.scales) for b in self.blocks)
        return keys, values

    def memory_bytes(self) -> int:
        fp = sum(_nbytes(t) for t in self.full_precision_tensors() if t is not None)
        return fp + sum(self.quantized_bytes())


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=2)


def predictor_parameters(predictors: CrossLayerPredictors) -> int:
    """Weights and biases of all key and value predictors."""
    return sum(p.weight.numel() + p.bias.numel()
               for d in (predictors.key_predictors, predictors.value_predictors) for p in d.values())


def cache_bits(cache, predictor_params: int = 0, param_bits: int = 16) -> dict[str, float]:
    """Measured bits per compressed value of ``cache`` without and with the predictor weights
    (``predictor_params`` parameters of ``param_bits`` bits) amortised over the values cached."""
    q_bits = q_values = all_values = 0
    for layer in cache.kv_layers():
        if not layer.is_initialized:
            continue
        rows = layer.key_tail.shape[0] * layer.key_tail.shape[1] * layer.key_tail.shape[3]
        q_bits += 8 * sum(layer.quantized_bytes())
        q_values += rows * sum(layer.quantized_tokens())
        all_values += 2 * rows * layer.get_seq_length()
    stats = cache.stats()
    extra = predictor_params * param_bits
    return {
        "bits_per_value_quantized": q_bits / q_values if q_values else math.nan,
        "bits_per_value_quantized_with_predictors": (q_bits + extra) / q_values if q_values else math.nan,
        "bits_per_value_all_in_fp16": stats["bits_per_value_all_in_fp16"],
        "bits_per_value_all_in_fp16_with_predictors":
            stats["bits_per_value_all_in_fp16"] + extra / all_values if all_values else math.nan,
    }
