"""The transformers ``Cache`` integration.

``make_cache(method, model)`` builds a :class:`CompressedCache`: the model's own layer
structure (``DynamicCache(config=...)``), with every full-attention layer replaced by the
method's layer. Layers of other kinds (sliding-window, linear-attention, shared) keep
transformers' own implementation, and the cache says so once.

:class:`QuantizedLayer` is the PyTorch reference of the quantized cache. It holds, per layer::

    [ sinks (fp16) | quantized keys / values (packed) | key tail / value tail (fp16) ]

Keys are quantized in blocks of ``G`` tokens once the key tail exceeds ``R`` tokens; values once
the value tail exceeds ``R`` by a block of ``block_tokens`` (16 at 2 bits; KIVI quantizes them token
by token, so the value tail here holds up to ``block_tokens - 1`` more fp16 tokens than KIVI's
sliding window, never fewer). Quantization is deferred to the start of the next ``update``, so
the attention of the step that appends a token always sees that token in full precision, as in
the Kitty and KIVI artifacts. Each token is quantized exactly once; ``update`` returns
dequantized keys and values for the model's attention.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from kvlab.attention import NAME as KVLAB_ATTENTION
from kvlab.attention import STATIC_STEP, mark_pending
from kvlab.attention import enable as enable_kvlab_attention
from kvlab.quant.codecs import Fields, KeyChannelCodec, ValueTokenCodec


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=2)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class PackedStore:
    """Fields of a codec, appended along dim 2 (tokens, or bytes of packed tokens).

    Without ``capacity`` the fields grow by concatenation and hold exactly what was appended.
    With ``capacity`` (tokens), each field's buffer is allocated once, at the first append, and
    written in place; ``fields`` are views of the filled part (no per-step reallocation, stable
    addresses for kernels). ``nbytes`` counts what is allocated.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.fields: Fields = {}
        self._buffers: Fields = {}
        self.tokens = 0

    def append(self, fields: Fields, tokens: int) -> None:
        if self.capacity is None:
            for name, t in fields.items():
                self.fields[name] = _cat(self.fields.get(name), t)
        else:
            if self.tokens + tokens > self.capacity:
                raise ValueError(f"the cache was preallocated for {self.capacity} tokens; "
                                 f"{self.tokens + tokens} do not fit (make_cache(..., max_length=...))")
            self.allocate(fields, tokens)
            for name, t in fields.items():
                start = self.fields[name].shape[2] if name in self.fields else 0
                self._buffers[name][:, :, start : start + t.shape[2]] = t
                self.fields[name] = self._buffers[name][:, :, : start + t.shape[2]]
        self.tokens += tokens

    def allocate(self, like: Fields, tokens: int) -> None:
        """Allocate the buffers (once) for fields shaped like ``like``, which encode ``tokens`` tokens."""
        for name, t in like.items():
            if name not in self._buffers:
                rows = -(-self.capacity * t.shape[2] // tokens)
                self._buffers[name] = t.new_empty(*t.shape[:2], rows, *t.shape[3:])

    def resize(self, tokens: int) -> None:
        """Make ``fields`` cover the first ``tokens`` tokens of the buffers (written by kernels in place)."""
        self.fields = {name: t[:, :, : t.shape[2] * tokens // self.capacity] for name, t in self._buffers.items()}
        self.tokens = tokens

    def buffers(self) -> Fields:
        """The preallocated buffers, whole (a static cache's kernels read lengths elsewhere)."""
        return self._buffers

    def apply(self, fn) -> None:
        """Apply a batch-dimension op (reorder, repeat, select) to every field."""
        if self.capacity is None:
            self.fields = {name: fn(t) for name, t in self.fields.items()}
        else:
            self._buffers = {name: fn(t) for name, t in self._buffers.items()}
            self.fields = {name: self._buffers[name][:, :, : t.shape[2]] for name, t in self.fields.items()}

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self._buffers if self.capacity is not None else self.fields).values())


class KVLayerMixin:
    """What every kvlab layer adds to transformers' layer API."""

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def quantized_tokens(self) -> tuple[int, int]:
        """How many tokens of keys and of values are held in compressed form."""
        return 0, 0

    def quantized_bytes(self) -> tuple[int, int]:
        return 0, 0

    def full_precision_elements(self) -> int:
        """Elements held in the model's dtype (sinks, residual, or the whole dense cache)."""
        return sum(t.numel() for t in self.full_precision_tensors() if t is not None)

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return ()


class FullPrecisionLayer(KVLayerMixin, DynamicLayer):
    """transformers' dynamic layer, with kvlab's accounting.

    With ``capacity`` (tokens; make_cache's ``max_length``), keys and values are written into
    buffers allocated once, at the first update, and ``keys``/``values`` are views of the filled
    part. Growing by ``torch.cat`` instead copies the whole cache at every append, so a chunked
    prefill briefly holds it twice: that, not the cache, would decide the largest batch that fits.
    Operations that replace ``keys`` (batch selection, beam reordering) drop back to concatenation.
    """

    capacity: int | None = None
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    fused = False  # CompressedCache.use_fused_attention: prefill chunks attend without repeating keys for GQA

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        length, new = self.get_seq_length(), key_states.shape[-2]
        if self.fused and length and new > 1:
            mark_pending(self)  # a chunk after the first: transformers' SDPA would repeat the whole cache per query head
        if self.capacity is None:
            return super().update(key_states, value_states, *args, **kwargs)
        if length + new > self.capacity:
            raise ValueError(f"the cache was preallocated for {self.capacity} tokens; {length} + {new} do not fit")
        if length == 0:
            B, H, _, D = key_states.shape
            self.buffers = tuple(t.new_empty(B, H, self.capacity, D) for t in (key_states, value_states))
            self.lazy_initialization(key_states, value_states)
        elif not self.preallocated():
            self.buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        kbuf, vbuf = self.buffers
        kbuf[:, :, length : length + new] = key_states
        vbuf[:, :, length : length + new] = value_states
        self.keys, self.values = kbuf[:, :, : length + new], vbuf[:, :, : length + new]
        return self.keys, self.values

    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        from kvlab.kernels.reference import grouped_attention, keep_mask

        mask = keep_mask(attention_mask, query.shape[2], self.keys.shape[2], query.device)
        return grouped_attention(query, self.keys, self.values, mask, scaling)

    def preallocated(self) -> bool:
        """``keys`` and ``values`` are still the leading views of the preallocated buffers."""
        return self.buffers is not None and all(
            t.data_ptr() == buf.data_ptr() and t.shape[:2] == buf.shape[:2] for t, buf in zip((self.keys, self.values),
                                                                                           self.buffers))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def _rows(self, fn) -> None:
        """A batch-row op; preallocated buffers stay preallocated (whole), so decoding still writes in place."""
        if self.get_seq_length() == 0:
            return
        if not self.preallocated():
            self.keys, self.values = fn(self.keys), fn(self.values)
            return
        length = self.keys.shape[2]
        self.buffers = tuple(fn(t) for t in self.buffers)
        self.keys, self.values = (t[:, :, :length] for t in self.buffers)

    def reset(self) -> None:
        self.buffers = None
        super().reset()

    def memory_bytes(self) -> int:
        if self.preallocated():
            return sum(_nbytes(buf) for buf in self.buffers)
        return _nbytes(self.keys) + _nbytes(self.values) if self.is_initialized else 0

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.keys, self.values) if self.is_initialized else ()


class CompressedLayer(KVLayerMixin, CacheLayerMixin):
    """Base of kvlab's own cache layers.

    A subclass keeps ``length`` (tokens seen) and implements ``_clear`` (the empty state) and
    ``_apply(fn)`` (a batch-row operation on every tensor it holds); the rest of transformers'
    layer API follows. ``crop`` drops the newest tokens from the full-precision tails
    (``key_tail``/``value_tail``): compressed tokens are write-once.
    """

    is_sliding = False
    is_compileable = False

    def _clear(self) -> None:
        raise NotImplementedError

    def _apply(self, fn) -> None:
        raise NotImplementedError

    def _apply_to(self, names: tuple[str, ...], fn) -> None:
        for name in names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Compression is per batch row, so selecting rows of the compressed data is exact.
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.length
        n = -tokens_to_remove
        if n <= 0:
            return
        tails = [t.shape[2] if t is not None else 0 for t in (self.key_tail, self.value_tail)]
        if n > min(tails):
            raise ValueError(f"cannot crop {n} tokens: only the newest {min(tails)} are in full precision and "
                             "compressed tokens are write-once")
        self.key_tail = self.key_tail[:, :, : tails[0] - n]
        self.value_tail = self.value_tail[:, :, : tails[1] - n]
        self.length -= n


class StoredLayer(CompressedLayer):
    """A layer whose compressed part lives in ``key_store``/``value_store`` (PackedStore)."""

    def memory_bytes(self) -> int:
        fp = sum(_nbytes(t) for t in self.full_precision_tensors())
        return fp + self.key_store.nbytes() + self.value_store.nbytes()

    def quantized_tokens(self) -> tuple[int, int]:
        return self.key_store.tokens, self.value_store.tokens

    def quantized_bytes(self) -> tuple[int, int]:
        return self.key_store.nbytes(), self.value_store.nbytes()


class QuantizedLayer(StoredLayer):
    is_croppable = True

    def __init__(self, key_codec: KeyChannelCodec, value_codec: ValueTokenCodec, residual: int, sinks: int,
                 layer_idx: int = 0):
        if residual < key_codec.group_size:
            raise ValueError(f"residual={residual} must be >= the key group size {key_codec.group_size}")
        super().__init__()
        self.layer_idx = layer_idx
        self.key_codec, self.value_codec = key_codec, value_codec
        self.residual, self.sinks = residual, sinks
        self.capacity: int | None = None  # tokens to preallocate packed storage for (make_cache's max_length)
        # Set by make_cache on CUDA: attention runs in the fused kernel over the packed storage
        # (kvlab.kernels) instead of over dequantized tensors returned by update().
        self.fused = False
        self._clear()

    def _clear(self) -> None:
        self.sink_keys = self.sink_values = None
        self.key_tail = self.value_tail = None
        self.key_store, self.value_store = PackedStore(self.capacity), PackedStore(self.capacity)
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    # -- the reference algorithm -------------------------------------------------------

    def _encoders(self):
        if self.fused:
            from kvlab.kernels import quantize_pack_keys, quantize_pack_values

            return (lambda x: quantize_pack_keys(self.key_codec, x)), (lambda x: quantize_pack_values(self.value_codec, x))
        return self.key_codec.encode, self.value_codec.encode

    def _flush(self) -> None:
        """Quantize what left the residual window: whole key blocks of ``G`` tokens (enough to bring the key
        tail back to <= R), whole value blocks of a few tokens (as many as keep the value tail >= R)."""
        encode_keys, encode_values = self._encoders()
        G = self.key_codec.group_size
        excess = 0 if self.key_tail is None else self.key_tail.shape[2] - self.residual
        if excess > 0:
            n = -(-excess // G) * G  # whole blocks, enough to bring the tail back to <= R
            self.key_store.append(encode_keys(self.key_tail[:, :, :n]), n)
            self.key_tail = self.key_tail[:, :, n:]
        excess = 0 if self.value_tail is None else self.value_tail.shape[2] - self.residual
        n = max(0, excess) // self.value_codec.block_tokens * self.value_codec.block_tokens
        if n:
            self.value_store.append(encode_values(self.value_tail[:, :, :n]), n)
            self.value_tail = self.value_tail[:, :, n:]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        n_sink = max(0, min(self.sinks - self.length, key_states.shape[2]))
        if n_sink:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :n_sink])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :n_sink])
        if key_states.shape[2] > n_sink:
            self.key_tail = _cat(self.key_tail, key_states[:, :, n_sink:])
            self.value_tail = _cat(self.value_tail, value_states[:, :, n_sink:])
        self.length += key_states.shape[2]
        if self.fused:
            mark_pending(self)
            return key_states, value_states  # attend() reads the packed storage
        return self.dequantized()

    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        from kvlab.kernels import fused_attend

        return fused_attend(self, query, attention_mask, scaling)

    def dequantized(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as attention sees them: [sinks | dequantized | fp16 tail], of batch ``rows``, in
        ``dtype`` (the layer's by default; the quantized part is decoded straight to it)."""
        dtype = dtype or self.dtype

        def parts(sink, store, codec, tail):
            held = [None if sink is None else sink[rows].to(dtype), self._decoded(store, codec, dtype, rows),
                    None if tail is None else tail[rows].to(dtype)]
            return torch.cat([t for t in held if t is not None], dim=2)

        return (parts(self.sink_keys, self.key_store, self.key_codec, self.key_tail),
                parts(self.sink_values, self.value_store, self.value_codec, self.value_tail))

    def _decoded(self, store: PackedStore, codec, dtype: torch.dtype, rows: slice) -> torch.Tensor | None:
        """Batch ``rows`` of the quantized part, decoded to ``dtype``."""
        return codec.decode({name: t[rows] for name, t in store.fields.items()}, dtype) if store.tokens else None

    def _apply(self, fn) -> None:
        self._apply_to(("sink_keys", "sink_values", "key_tail", "value_tail"), fn)
        self.key_store.apply(fn)
        self.value_store.apply(fn)

    # -- accounting ----------------------------------------------------------------------

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.sink_keys, self.sink_values, self.key_tail, self.value_tail


class CompressedCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are a kvlab method's layers."""

    def __init__(self, method, config, max_length: int | None = None) -> None:
        text_config = config.get_text_config(decoder=True)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        method.check_head_dim(head_dim)
        layers = list(DynamicCache(config=config).layers)
        if not layers:
            layers = [DynamicLayer() for _ in range(text_config.num_hidden_layers)]
        kept = []
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[i] = method.make_layer(i, head_dim)
            else:
                kept.append(f"{i} ({type(layer).__name__})")
        if kept:
            warnings.warn(
                f"kvlab {method.label}: {len(kept)} of {len(layers)} layers are not full-attention layers "
                f"and keep transformers' own cache uncompressed: {', '.join(kept)}",
                stacklevel=3,
            )
        super().__init__(layers=layers)
        self.method, self.head_dim = method, head_dim
        self.config = config
        if max_length is not None:
            for layer in self.layers:
                if isinstance(layer, (QuantizedLayer, FullPrecisionLayer)):
                    layer.capacity = max_length
                    layer.reset()

    def use_fused_attention(self, model) -> None:
        """On CUDA: quantize with the Triton kernels and attend over the packed cache directly; fp16 layers
        attend prefill chunks through :func:`~kvlab.kernels.reference.grouped_attention`."""
        fusable = [layer for layer in self.layers if isinstance(layer, (QuantizedLayer, FullPrecisionLayer))]
        if not fusable:
            return
        enable_kvlab_attention(model)
        for layer in fusable:
            layer.fused = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if STATIC_STEP.layers is not None:  # a static decode step (kvlab.static): one opaque op for the compiler
            return torch.ops.kvlab.static_update(key_states, value_states), value_states
        mark_pending(None)  # a mark no attention consumed (a layer updated directly, a failed forward) is stale
        layer = self.layers[layer_idx]
        if getattr(layer, "fused", False) and self.config._attn_implementation != KVLAB_ATTENTION:
            raise RuntimeError(
                f"this kvlab cache reads its packed storage in the '{KVLAB_ATTENTION}' attention implementation, "
                f"but the model now uses '{self.config._attn_implementation}'; make a new cache after changing it"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_layers(self) -> list[KVLayerMixin]:
        return [layer for layer in self.layers if isinstance(layer, KVLayerMixin)]

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds (all layers, compressed and not)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, KVLayerMixin):
                total += layer.memory_bytes()
            elif getattr(layer, "is_initialized", False):
                total += _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        return total

    def stats(self) -> dict[str, float]:
        """Measured bits per value of the kvlab layers, from the tensors they hold.

        ``bits_per_value_all_in``: every byte held, in the model's dtype; ``..._fp16``: the same
        with full-precision parts counted at 16 bits (a 16-bit deployment); ``..._quantized``:
        codes, scales, zero points and indices over the values they encode.
        """
        values = fp_elements = 0
        q_bits = q_values = 0.0
        mem = 0
        for layer in self.kv_layers():
            if not layer.is_initialized:
                continue
            batch_heads = layer_batch_heads(layer)
            values += 2 * batch_heads * self.head_dim * layer.get_seq_length()
            fp_elements += layer.full_precision_elements()
            mem += layer.memory_bytes()
            for tokens, nbytes in zip(layer.quantized_tokens(), layer.quantized_bytes()):
                q_bits += 8 * nbytes
                q_values += batch_heads * self.head_dim * tokens
        nan = float("nan")
        return {
            "cache_bytes": self.memory_bytes(),
            "bits_per_value_all_in": 8 * mem / values if values else nan,
            "bits_per_value_all_in_fp16": (16 * fp_elements + q_bits) / values if values else nan,
            "bits_per_value_quantized": q_bits / q_values if q_values else nan,
        }


def layer_batch_heads(layer: CacheLayerMixin) -> int:
    for name in ("keys", "sink_keys", "key_tail"):
        t = getattr(layer, name, None)
        if t is not None and t.dim() == 4:
            return t.shape[0] * t.shape[1]
    store = getattr(layer, "key_store", None)
    t = next(iter(store.fields.values()))
    return t.shape[0] * t.shape[1]


def make_cache(method, model_or_config, *, fused: bool = True, max_length: int | None = None,
               **params: Any) -> CompressedCache:
    """One line to a compressed cache: ``make_cache("kitty-pro", model)``.

    ``method`` is a method spec string (``"kivi-2:group_size=32"``) or a Method instance;
    keyword parameters override the spec's (``make_cache("kivi", model, bits=2, group_size=64)``). Given a model on CUDA, the cache
    switches the model to the ``"kvlab"`` attention implementation and uses the fused Triton
    kernels (``fused=False`` keeps the PyTorch reference path); methods that run their own
    attention (eviction scores, approximate arithmetic) switch it on any device. ``max_length`` preallocates the
    packed storage for that many tokens (no reallocation while decoding).
    """
    from kvlab.methods import build_method, parse_method

    if isinstance(method, str):
        method = parse_method(method)
    if params:
        method = build_method(method.preset_name or method.name, **{**method.params(), **params})
    config = getattr(model_or_config, "config", model_or_config)
    cache = CompressedCache(method, config, max_length)
    if not hasattr(model_or_config, "set_attn_implementation"):
        return cache
    if getattr(method, "needs_kvlab_attention", False):
        enable_kvlab_attention(model_or_config)
    if torch.device(model_or_config.device).type == "cuda" and fused:
        cache.use_fused_attention(model_or_config)
    return cache
