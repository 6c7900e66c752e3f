"""PyTorch references of the kernels, and the path used where a kernel does not apply.

The quantize+pack reference is the codec itself (``KeyChannelCodec.encode`` /
``ValueTokenCodec.encode``); the decode-attention reference dequantizes the layer and runs
exact attention, bottom-right causal, with an optional boolean keep-mask or additive mask.

Both keep the transient memory of a long prefill chunk bounded: the query heads of a KV head are
folded into the query rows, so keys and values are never repeated for the GQA group, and a
quantized layer is dequantized a slice of batch rows at a time (``TRANSIENT_BYTES``). Repeating
and dequantizing a whole layer at once took 8x the fp16 size of one layer's cache and decided the
largest batch that fits a long context (docs/kernels.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSIENT_BYTES = 1 << 30  # dequantized keys + values of one slice of batch rows


def keep_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean keep-mask ``[B or 1, 1, q_len, kv_len]``: the given mask AND bottom-right causality."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    if attention_mask is None:
        return causal
    mask = attention_mask[..., -q_len:, :kv_len]
    mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return mask & causal


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scaling: float | None) -> torch.Tensor:
    """Exact attention of ``query [B, Hq, q, D]`` over ``keys/values [B, H, L, D]`` (Hq a multiple of H) under
    the boolean ``mask [B or 1, 1, q, L]`` -> ``[B, q, Hq, D]``. Query head ``h * n_rep + r`` reads KV head ``h``
    (transformers' ``repeat_kv`` order); its rows become rows ``r * q + i`` of KV head ``h``."""
    B, Hq, q_len, D = query.shape
    H = keys.shape[1]
    n_rep = Hq // H
    rows = query.reshape(B, H, n_rep * q_len, D)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask.repeat(1, 1, n_rep, 1), scale=scaling)
    return out.reshape(B, Hq, q_len, D).transpose(1, 2).contiguous()


def kv_heads(layer) -> int:
    """KV heads of a QuantizedLayer, from whichever part it holds."""
    return next(t for t in (layer.sink_keys, layer.key_tail, layer.key_store.fields.get("scale"),
                            layer.value_store.fields.get("scale")) if t is not None).shape[1]


def reference_attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over the layer's cache -> ``[B, q, Hq, D]`` in the compute dtype.

    By default this is what the model computes without kernels (the layer's own dequantization,
    SDPA in the query's dtype); ``compute_dtype=torch.float32`` is the tests' exact reference.
    """
    dtype = compute_dtype or query.dtype
    B, _, q_len, D = query.shape
    L = layer.get_seq_length()
    mask = keep_mask(attention_mask, q_len, L, query.device)
    step = max(1, TRANSIENT_BYTES // (2 * kv_heads(layer) * L * D * torch.finfo(dtype).bits // 8))
    out = []
    for b0 in range(0, B, step):
        rows = slice(b0, b0 + step)
        keys, values = layer.dequantized(compute_dtype, rows)
        out.append(grouped_attention(query[rows].to(dtype), keys.to(dtype), values.to(dtype),
                                     mask[rows] if mask.shape[0] > 1 else mask, scaling))
    return out[0] if len(out) == 1 else torch.cat(out)
