"""StreamingLLM: the first ``sinks`` tokens plus the most recent ones (kvpress: ``n_sink=4``).

No scores; the cached keys keep their original RoPE positions (no re-rotation, as kvpress's
``StreamingLLMPress`` without ``KeyRerotationPress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.eviction import EvictionMethod, top_k_mask
from kvlab.methods.base import register


@register("streamingllm")
@dataclass(frozen=True)
class StreamingLLM(EvictionMethod):
    sinks: int = 4

    scored: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0:
            raise ValueError(f"{self.label}: sinks={self.sinks} must be >= 0")

    def select(self, scores, positions: torch.Tensor, k: int, protect: torch.Tensor) -> torch.Tensor:
        sinks = (positions >= 0) & (positions < self.sinks)  # left padding has negative positions
        priority = positions.float().masked_fill(sinks | protect, float("inf"))
        return top_k_mask(priority, k)
