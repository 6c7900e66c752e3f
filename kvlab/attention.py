"""The ``"kvlab"`` attention implementation: lets a cache layer compute its own attention.

transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function, which
does not see the cache. A kvlab layer that wants to run attention itself (fused kernels that
read the packed cache, eviction scores gathered in the attention pass, approximate
arithmetic) calls :func:`mark_pending` in ``update``; the attention function below then hands
the query to that layer's ``attend``. Everything else goes to SDPA unchanged, so enabling the
implementation never changes a plain model's outputs.

A static decode step (:mod:`kvlab.static`) routes differently, so that ``torch.compile`` can trace
the decoder layers around the cache: while :func:`static_step` is active, ``CompressedCache.update``
and the attention function call the custom ops ``kvlab::static_update`` and
``kvlab::static_attend``, opaque to the compiler. The ops take no layer index (a constant index
would make every layer a separate compiled graph): the n-th update of a step is layer n, and each
attention call attends over the layer updated just before it, as a decoder's forward runs them.
Eager calls check that order against ``module.layer_idx``. The update returns a token that the
attention consumes, so the compiled graph keeps the two in order.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvlab"
_pending = threading.local()


def mark_pending(layer) -> None:
    """Called by a layer's ``update``: the next attention call of its layer index goes to ``layer.attend``."""
    _pending.layer = layer


class _StaticStep:
    layers: list | None = None  # the layers of the static cache whose decode step is running
    updated = 0  # layers updated so far in this step


STATIC_STEP = _StaticStep()


@contextmanager
def static_step(layers: list):
    """Route cache updates and attention of the forwards inside to ``layers`` (static layers)."""
    STATIC_STEP.layers, STATIC_STEP.updated = layers, 0
    try:
        yield
    finally:
        STATIC_STEP.layers = None


@torch.library.custom_op("kvlab::static_update", mutates_args=())
def static_update(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Store the step's key and value in the next static layer; returns the token its attention waits on."""
    STATIC_STEP.layers[STATIC_STEP.updated].store(key, value)
    STATIC_STEP.updated += 1
    return key.new_empty(0)


@static_update.register_fake
def _(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return key.new_empty(0)


@torch.library.custom_op("kvlab::static_attend", mutates_args=())
def static_attend(query: torch.Tensor, stored: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Attention of ``query [B, H, q, D]`` over the layer last updated (``stored``: its token) -> ``[B, q, H, D]``."""
    return STATIC_STEP.layers[STATIC_STEP.updated - 1].attend_step(query, scaling).contiguous()


@static_attend.register_fake
def _(query: torch.Tensor, stored: torch.Tensor, scaling: float | None) -> torch.Tensor:
    B, H, q, D = query.shape
    return query.new_empty(B, q, H, D)


def kvlab_attention(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs):
    if STATIC_STEP.layers is not None:  # ``key`` is the token of kvlab::static_update
        if not torch.compiler.is_compiling() and module.layer_idx != STATIC_STEP.updated - 1:
            raise RuntimeError(f"static decoding expects each layer to attend right after its cache update; layer "
                               f"{module.layer_idx} attends after {STATIC_STEP.updated} updates")
        return torch.ops.kvlab.static_attend(query, key, scaling), None
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
