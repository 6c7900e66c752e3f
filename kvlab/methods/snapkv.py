"""SnapKV (kvpress parameters): keys scored by the attention of an observation window of queries.

At the prefill, the window is the last ``window`` prompt queries (kvpress: 64); during decoding
it is the queries since the previous compression, which happens every ``interval`` calls
(default: ``window``, so each compression again looks at ``window`` queries). The attention of
those queries (softmax over all keys, the window's own included) is summed per key over the
window and the group's query heads, average-pooled over ``kernel`` neighbouring kept entries
(kvpress: 5, ``avg_pool1d``, zero padding counted), and the top keys per KV head are kept. The
``window`` most recent tokens are always kept and count toward the budget, as in kvpress (sums
instead of kvpress's means: a constant factor per head, the same selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvlab.eviction import EvictionMethod, recent_mask, top_k_mask
from kvlab.methods.base import register


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(EvictionMethod):
    interval: int = 64
    window: int = 64
    kernel: int = 5

    reset_scores: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise ValueError(f"{self.label}: window={self.window} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.label}: kernel={self.kernel} must be a positive odd number")

    def score_rows(self, query_length: int) -> int:
        return max(0, query_length - self.window)

    def select(self, scores: torch.Tensor, positions, k: int, protect: torch.Tensor) -> torch.Tensor:
        B, H, n = scores.shape
        pooled = F.avg_pool1d(scores.view(B * H, 1, n), self.kernel, stride=1, padding=self.kernel // 2).view(B, H, n)
        forced = recent_mask(n, min(self.window, k), scores.device) | protect
        return top_k_mask(pooled.masked_fill(forced, float("inf")), k)
