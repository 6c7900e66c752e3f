"""CAB (FRC-CAB-, median-bridge variant): recent + heavy hitters + "bridge" tokens.

Of a budget ``k``: ``int(0.3 k)`` most recent kept tokens (local), ``int(0.2 k)`` bridges, and
the rest the top cumulative scores (H2O's scores; rounding leftovers go to importance, as in
the repository's ``ThreeComponentEvictionPolicy``). Bridges are, among the tokens left after the
local and importance picks, those whose score is closest to the (lower) median of those
remaining scores: the README/STATUS.md rule. The repository's stored policy code instead picks
bridges by lowest Forman-Ricci curvature of a layer-0 key-similarity graph, or at random without
FRC scores; neither is reproduced here (see docs/eviction.md). Ties go to the more recent token.
Selection is O(N) per eviction (kthvalue/median, no sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.eviction import EvictionMethod, recent_mask, top_k_mask
from kvlab.methods.base import register


@register("cab")
@dataclass(frozen=True)
class CAB(EvictionMethod):
    local_ratio: float = 0.3
    bridge_ratio: float = 0.2

    def validate(self) -> None:
        super().validate()
        if self.local_ratio < 0 or self.bridge_ratio < 0 or self.local_ratio + self.bridge_ratio > 1:
            raise ValueError(f"{self.label}: local_ratio and bridge_ratio must be >= 0 and sum to <= 1")

    def select(self, scores: torch.Tensor, positions, k: int, protect: torch.Tensor) -> torch.Tensor:
        inf = float("inf")
        n = scores.shape[-1]
        local = recent_mask(n, int(k * self.local_ratio + 1e-6), scores.device) | protect
        bridges = int(k * self.bridge_ratio + 1e-6)
        n_fixed = int(local.sum())
        keep = max(n_fixed, k - bridges)  # local + importance
        chosen = top_k_mask(scores.masked_fill(local, inf), min(keep, k))
        if keep >= k:
            return chosen
        padding = positions < 0  # left padding: never a bridge, not part of the median
        rest = scores.masked_fill(padding, float("nan"))[~chosen].view(*scores.shape[:-1], -1)  # same count per row
        median = rest.nanmedian(-1, keepdim=True).values
        closeness = -(scores - median).abs()
        return top_k_mask(closeness.masked_fill(padding, -inf).masked_fill(chosen, inf), k)
