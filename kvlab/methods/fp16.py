"""The dense baseline: transformers' own dynamic cache layer, with accounting."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.cache import FullPrecisionLayer
from kvlab.methods.base import Method, register


@register("fp16", presets={"dense": {}})
@dataclass(frozen=True)
class FP16(Method):
    def make_layer(self, layer_idx: int, head_dim: int) -> FullPrecisionLayer:
        layer = FullPrecisionLayer()
        layer.layer_idx = layer_idx
        return layer
