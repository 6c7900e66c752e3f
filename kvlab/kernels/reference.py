"""PyTorch references of the kernels, and the path used where a kernel does not apply.

The quantize+pack reference is the codec itself (``KeyChannelCodec.encode`` /
``ValueTokenCodec.encode``); the decode-attention reference dequantizes the layer and runs
exact attention, bottom-right causal, with an optional boolean keep-mask or additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean keep-mask ``[B or 1, 1, q_len, kv_len]``: the given mask AND bottom-right causality."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    if attention_mask is None:
        return causal
    mask = attention_mask[..., -q_len:, :kv_len]
    mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return mask & causal


def dequantized(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A QuantizedLayer's ``[sinks | dequantized | tail]`` keys and values, decoded straight to ``dtype``."""
    def parts(sink, store, codec, tail):
        decoded = codec.decode(store.fields, dtype) if store.tokens else None
        return torch.cat([t.to(dtype) for t in (sink, decoded, tail) if t is not None], dim=2)

    return (parts(layer.sink_keys, layer.key_store, layer.key_codec, layer.key_tail),
            parts(layer.sink_values, layer.value_store, layer.value_codec, layer.value_tail))


def reference_attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over the layer's cache -> ``[B, q, Hq, D]`` in the compute dtype.

    By default this is what the model computes without kernels (the layer's own dequantization,
    SDPA in the query's dtype); ``compute_dtype=torch.float32`` is the tests' exact reference.
    """
    dtype = compute_dtype or query.dtype
    keys, values = layer.dequantized() if compute_dtype is None else dequantized(layer, dtype)
    B, Hq, q_len, D = query.shape
    n_rep = Hq // keys.shape[1]
    keys = keys.to(dtype).repeat_interleave(n_rep, dim=1)
    values = values.to(dtype).repeat_interleave(n_rep, dim=1)
    mask = keep_mask(attention_mask, q_len, keys.shape[2], query.device)
    out = F.scaled_dot_product_attention(query.to(dtype), keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()
