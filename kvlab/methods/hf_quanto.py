"""HF's own ``QuantizedCache`` layer (quanto backend) as a reference row, run through kvlab's loops.

It re-quantizes its whole cache each time the residual fills (dequantize, concatenate, quantize),
and quantizes keys and values with ``axis=0`` groups of 64, as transformers does by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import QuantoQuantizedLayer

from kvlab.cache import KVLayerMixin
from kvlab.methods.base import Method, register


def _tensor_bytes(t) -> int:
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class QuantoLayer(KVLayerMixin, QuantoQuantizedLayer):
    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        parts = (self._quantized_keys, self._quantized_values, self.keys, self.values)
        return sum(_tensor_bytes(t) for t in parts)

    def quantized_bytes(self) -> tuple[int, int]:
        return _tensor_bytes(self._quantized_keys), _tensor_bytes(self._quantized_values)

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.keys, self.values) if self.is_initialized and self.keys.dim() == 4 else ()

    def quantized_tokens(self) -> tuple[int, int]:
        n = self.get_seq_length() - (self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0)
        return n, n


@register("hf-quanto", presets={"hf-quanto-2": {"bits": 2}, "hf-quanto-4": {"bits": 4}})
@dataclass(frozen=True)
class HFQuanto(Method):
    bits: int = 4
    group_size: int = 64
    residual: int = 128

    def validate(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"{self.label}: bits={self.bits} is not supported by quanto; choose 2 or 4")
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise ValueError(f"{self.label} needs optimum-quanto: pip install optimum-quanto") from None

    def make_layer(self, layer_idx: int, head_dim: int) -> QuantoLayer:
        return QuantoLayer(nbits=self.bits, q_group_size=self.group_size, residual_length=self.residual)

    def bits_per_value(self, head_dim: int) -> float:
        return self.bits + 2 * 16 / self.group_size

    def full_precision_tokens(self, length: int) -> int:
        return self.residual
