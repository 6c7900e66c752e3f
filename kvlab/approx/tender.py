"""Tender baseline (Lee et al., ISCA'24), INT4, as fake quantization.

Weights: symmetric INT4 per output channel. Activations: for each chunk of rows (tokens),
a per-channel bias (the chunk's mid-range) is removed; channels are then split into groups
by their remaining absmax, group ``i`` using scale ``s_max / 2**i``, so partial sums of the
groups can be rescaled with shifts. Codes are symmetric INT4 in ``[-qmax, qmax]``.
Attention (``tender_attention``, the ``"tender-int4"`` attention implementation that
``apply(model, "tender-int4")`` switches on): both products take INT4 operands. ``Q`` and the
softmax output ``P`` are activations (rows = queries); ``K`` (one scale per token) and ``V``
(one scale per head channel) are the other operand, quantized like weight rows.
Written from the paper's description (no reference code was available to check against).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "tender-int4"


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 4, dim: int = 1) -> torch.Tensor:
    """Fake-quantized ``w [N, K]``: symmetric, one scale per output row (absmax along ``dim``)."""
    qmax = (1 << (bits - 1)) - 1
    scale = w.float().abs().amax(dim, keepdim=True).clamp_min(1e-8) / qmax
    return (torch.round(w.float() / scale).clamp(-qmax, qmax) * scale).to(w.dtype)


def quantize_activation(
    x: torch.Tensor, bits: int = 4, chunk_size: int = 256, n_groups: int = 8
) -> torch.Tensor:
    """Fake-quantized activations ``x [..., K]`` with per-chunk channel bias and
    power-of-two channel-group scales."""
    qmax = (1 << (bits - 1)) - 1
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    out = torch.empty_like(flat)
    for r0 in range(0, flat.shape[0], chunk_size):
        chunk = flat[r0 : r0 + chunk_size]
        bias = (chunk.amax(0) + chunk.amin(0)) / 2
        centred = chunk - bias
        ch_max = centred.abs().amax(0)  # [K]
        top = ch_max.max().clamp_min(1e-8)
        # group i holds channels with top/2**(i+1) < max <= top/2**i; the last takes the rest
        group = torch.floor(torch.log2(top / ch_max.clamp_min(1e-30))).clamp(0, n_groups - 1)
        scale = top / qmax / torch.pow(2.0, group)
        out[r0 : r0 + chunk_size] = torch.round(centred / scale).clamp(-qmax, qmax) * scale + bias
    return out.reshape(shape).to(x.dtype)


class TenderLinear(nn.Module):
    """``nn.Linear`` with Tender INT4 weights and activations (fake-quantized)."""

    def __init__(self, linear: nn.Linear, bits: int = 4, chunk_size: int = 256, n_groups: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.chunk_size, self.n_groups = bits, chunk_size, n_groups
        self.register_buffer("weight", quantize_weight_per_channel(linear.weight.detach(), bits))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_activation(x, self.bits, self.chunk_size, self.n_groups)
        return nn.functional.linear(xq, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _per_matrix(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Tender's activation quantizer on each ``[rows, channels]`` matrix of ``x [..., rows, channels]``."""
    flat = x.reshape(-1, *x.shape[-2:])
    return torch.stack([quantize_activation(m, bits) for m in flat]).view(x.shape)


def tender_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     bits: int = 4, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal (bottom-right) attention with INT4 fake-quantized ``Q``, ``K``, ``P``, ``V``;
    ``query [B, Hq, Q, D]``, ``key``/``value [B, Hkv, T, D]`` -> ``[B, Q, Hq, D]``."""
    from kvlab.kernels.reference import keep_mask

    B, Hq, Q, D = query.shape
    r = Hq // key.shape[1]
    q = _per_matrix(query.float(), bits)
    k = quantize_weight_per_channel(key.float(), bits, dim=-1).repeat_interleave(r, 1)
    v = quantize_weight_per_channel(value.float(), bits, dim=-2).repeat_interleave(r, 1)
    s = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    s = s.masked_fill(~keep_mask(attention_mask, Q, key.shape[2], query.device), float("-inf"))
    p = _per_matrix(s.softmax(-1), bits)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, tender_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
