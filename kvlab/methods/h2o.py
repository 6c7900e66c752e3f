"""H2O: the most recent tokens plus the heavy hitters of cumulative attention.

Per layer and KV head, each key's score is the attention mass it received from every query that
attended to it (prefill and decode; GQA: summed over the group's query heads), accumulated
without decay. Of a budget ``k``, the ``max(1, int(0.2 k))`` most recent kept tokens stay
(FRC-CAB-'s ``h2o_select_indices``, local_ratio 0.2) and the rest are the top scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.eviction import EvictionMethod, recent_mask, top_k_mask
from kvlab.methods.base import register


@register("h2o")
@dataclass(frozen=True)
class H2O(EvictionMethod):
    recent_ratio: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent_ratio <= 1:
            raise ValueError(f"{self.label}: recent_ratio={self.recent_ratio} must be in [0, 1]")

    def select(self, scores: torch.Tensor, positions, k: int, protect: torch.Tensor) -> torch.Tensor:
        recent = max(1, int(k * self.recent_ratio + 1e-6))
        forced = recent_mask(scores.shape[-1], recent, scores.device) | protect
        return top_k_mask(scores.masked_fill(forced, float("inf")), k)
