"""The ``"kvlab"`` attention implementation: lets a cache layer compute its own attention.

transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function, which
does not see the cache. A kvlab layer that wants to run attention itself (fused kernels that
read the packed cache, eviction scores gathered in the attention pass, approximate
arithmetic) calls :func:`mark_pending` in ``update``; the attention function below then hands
the query to that layer's ``attend``. Everything else goes to SDPA unchanged, so enabling the
implementation never changes a plain model's outputs.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvlab"
_pending = threading.local()


def mark_pending(layer) -> None:
    """Called by a layer's ``update``: the next attention call of its layer index goes to ``layer.attend``."""
    _pending.layer = layer


def kvlab_attention(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs):
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    if layer is not None and layer.layer_idx == getattr(module, "layer_idx", None):
        return layer.attend(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, kvlab_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model) -> None:
    """Route the model's attention through kvlab (a no-op for layers that do not ask for it)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
