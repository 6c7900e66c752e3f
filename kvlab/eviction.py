"""Token eviction in the decode loop: the policy base class and the full-precision evicting layer.

An evicting layer stores, per batch row and KV head, only the tokens it keeps: ``keys`` and
``values`` are ``[B, H, kept, D]`` and each head keeps the same number of tokens at its own
positions (stored in position order). Keys are cached post-RoPE, so a kept key needs no
re-rotation; what must stay right is the position of *new* tokens. transformers 5.x derives
``position_ids`` from ``cache.get_seq_length()``, so the layer reports the number of tokens seen
there, and ``get_mask_sizes`` reports the kept length (with an offset that maps the kept keys
before every new query), so the mask matches the tensors attention receives.

Per step: ``update`` appends the new tokens and marks the layer pending; the "kvlab" attention
implementation then calls ``attend``, which computes the attention output and, in the same pass,
the attention mass each key receives (query rows in chunks, so a prefill never materialises the
whole ``N x N`` matrix at once); after that the layer evicts down to its budget, so the next
step's mask already sees the smaller cache.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvlab.attention import mark_pending
from kvlab.cache import CompressedLayer, _nbytes
from kvlab.methods.base import Method

CHUNK_ROWS = 256  # query rows per block of the scoring attention (bounds prefill memory)


def top_k_mask(priority: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` True per row of the last dim: the largest priorities, ties to the later entries.

    O(N) per row (``kthvalue`` and a cumulative count), deterministic.
    """
    n = priority.shape[-1]
    if k >= n:
        return torch.ones_like(priority, dtype=torch.bool)
    thr = priority.kthvalue(n - k + 1, dim=-1, keepdim=True).values  # the k-th largest
    above = priority > thr
    tie = priority == thr
    need = k - above.sum(-1, keepdim=True)
    ties_from_end = tie.flip(-1).cumsum(-1).flip(-1)
    return above | (tie & (ties_from_end <= need))


def mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Entry indices of a mask with ``k`` True per row, in increasing (position) order."""
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return idx[mask].view(*mask.shape[:-1], k)


def recent_mask(n: int, recent: int, device) -> torch.Tensor:
    """The last ``recent`` entries of a position-ordered store."""
    return torch.arange(n, device=device) >= n - recent


@dataclass(frozen=True)
class EvictionMethod(Method):
    """An eviction policy: how many tokens each head keeps, and which.

    ``budget`` > 0 fixes the tokens kept per head; otherwise it is ``(1 - sparsity) x tokens seen``.
    The layer evicts when it holds more than the budget and ``interval`` forward calls have passed
    since the last eviction (the cache grows to at most budget + interval - 1 + query length).
    """

    sparsity: float = 0.5
    budget: int = 0
    interval: int = 1

    scored: ClassVar[bool] = True  # accumulates attention mass in ``attend``
    reset_scores: ClassVar[bool] = False  # scores restart after each eviction (SnapKV's window)
    needs_kvlab_attention: ClassVar[bool] = True

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"{self.label}: sparsity={self.sparsity} must be in [0, 1)")
        if self.budget < 0:
            raise ValueError(f"{self.label}: budget={self.budget} must be >= 0 (0: use sparsity)")
        if self.interval < 1:
            raise ValueError(f"{self.label}: interval={self.interval} must be >= 1")

    def token_budget(self, seen: int) -> int:
        return self.budget or max(1, int(seen * (1 - self.sparsity) + 1e-6))

    def score_rows(self, query_length: int) -> int:
        """First query row (of a forward call) whose attention counts toward the scores."""
        return 0

    def select(self, scores: torch.Tensor | None, positions: torch.Tensor, k: int,
               protect: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[B, H, N]`` with exactly ``k`` True per row.

        ``scores``: [B, H, N] float32 (None if not ``scored``); ``positions``: [B, H, N] absolute
        positions, increasing along N; ``protect``: [N] entries that must be kept.
        """
        raise NotImplementedError

    def make_layer(self, layer_idx: int, head_dim: int) -> "EvictionLayer":
        return EvictionLayer(self, layer_idx)

    # -- naming: the budget is always part of the label, so units at different sparsities differ --

    def with_budget(self, sparsity: float | None = None, budget: int | None = None) -> "EvictionMethod":
        changes: dict[str, Any] = {}
        if sparsity is not None:
            changes.update(sparsity=sparsity, budget=0)
        if budget is not None:
            changes.update(budget=budget)
        m = self._replace(**changes)
        m.validate()
        return m

    def _replace(self, **changes: Any) -> "EvictionMethod":
        m = dataclasses.replace(self, **changes)
        object.__setattr__(m, "preset_name", self.preset_name)
        return m

    @property
    def budget_tag(self) -> str:
        return f"b{self.budget}" if self.budget else f"s{self.sparsity:g}"

    @property
    def base_label(self) -> str:
        """The label without sparsity/budget, e.g. ``h2o`` or ``h2o:interval=4``."""
        return self._replace(sparsity=type(self).sparsity, budget=0).plain_label

    @property
    def plain_label(self) -> str:
        return Method.label.fget(self)  # type: ignore[attr-defined]

    @property
    def label(self) -> str:
        base = self.base_label
        tag = f"budget={self.budget}" if self.budget else f"sparsity={self.sparsity:g}"
        return base + ("," if ":" in base else ":") + tag


class EvictionMixin:
    """Score accumulation, the scoring attention and eviction, shared by the evicting layers.

    A subclass provides the storage: ``_kept()`` (entries held per head), ``_protect()`` (entries
    that must survive, [N] bool) and ``_keep(idx)`` (gather ``[B, H, k]`` entry indices).
    """

    method: EvictionMethod
    layer_idx: int

    def _reset_eviction(self) -> None:
        self.seen = 0
        self.scores: torch.Tensor | None = None  # [B, H, kept] float32 attention mass
        self.positions: torch.Tensor | None = None  # [B, H, kept] int32 absolute positions
        self._since_eviction = 0
        self._awaiting_attend = False
        self.valid: torch.Tensor | None = None  # [B, H, kept] bool: False for left padding
        self.row_offset: torch.Tensor | None = None  # [B] padding length: positions count from the first real token

    def _track(self, key_states: torch.Tensor) -> None:
        if self._awaiting_attend:
            raise RuntimeError(
                f"kvlab {self.method.label}: attention did not run through the layer; eviction needs "
                "the kvlab attention implementation: kvlab.attention.enable(model)"
            )
        B, H, q, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
        new_pos = new_pos.expand(B, H, q)
        if self.row_offset is not None:
            new_pos = new_pos - self.row_offset.view(B, 1, 1)
        self.positions = new_pos.clone() if self.positions is None else torch.cat([self.positions, new_pos], 2)
        if self.method.scored:
            zeros = torch.zeros(B, H, q, device=key_states.device, dtype=torch.float32)
            self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], 2)
        self.seen += q
        self._since_eviction += 1
        self._awaiting_attend = True
        mark_pending(self)

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               scaling: float | None = None, **kwargs) -> torch.Tensor:
        self._awaiting_attend = False
        query_valid = self._record_padding(attention_mask, query.shape[2])
        mask = self._kept_mask(attention_mask, query.shape[2])
        if self.method.scored:
            score = _scorer(query, key, mask)
            out, mass = score(query, key, value, mask, scaling, self.method.score_rows(query.shape[2]), query_valid)
            self.scores += mass
        else:
            if mask is not attention_mask:  # per KV head -> per query head
                mask = mask.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            out = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)[0]
        self._before_eviction()
        self._maybe_evict()
        return out

    def _record_padding(self, attention_mask, q: int) -> torch.Tensor | None:
        """Mark the new entries that are padding (masked even for the last query row); returns the
        new queries' validity [B, q], or None without a mask. Left padding found in the first call
        shifts the row's positions so that sinks are its first real tokens."""
        B, H = self.positions.shape[:2]
        if attention_mask is None:
            new_valid = torch.ones(B, q, dtype=torch.bool, device=self.positions.device)
        else:
            last = attention_mask[:, 0, -1, -q:]
            new_valid = (last if last.dtype == torch.bool else last == 0).expand(B, q)
        if self.valid is None and not bool(new_valid.all()):
            self.row_offset = (~new_valid).sum(-1).to(self.positions.dtype)
            self.positions = self.positions - self.row_offset.view(B, 1, 1)
        new = new_valid.view(B, 1, q).expand(B, H, q)
        self.valid = new.clone() if self.valid is None else torch.cat([self.valid, new], 2)
        return None if attention_mask is None else new_valid

    def _kept_mask(self, attention_mask, q: int):
        """The attention mask over the kept entries. transformers' mask assumes the kept entries are
        the most recent positions, which holds without padding; with padding (found in the first call,
        as ``_record_padding`` expects it), build it per KV head from the entries' validity (every query
        also sees itself, so no row is empty). Deciding by ``row_offset``, not by ``valid.all()``, keeps
        the host from waiting on the device at every step."""
        if attention_mask is None or self.row_offset is None:
            return attention_mask
        n = self.valid.shape[2]
        rows = torch.arange(q, device=self.valid.device)[:, None] + (n - q)
        cols = torch.arange(n, device=self.valid.device)[None, :]
        return (self.valid[:, :, None, :] | (cols == rows)) & (cols <= rows)  # [B, H, q, n]

    def _before_eviction(self) -> None:
        """Hook for storage that reorganises itself after a step (quantization of the residual)."""

    def _maybe_evict(self) -> None:
        n = self._kept()
        protect = self._protect(n)
        k = max(self.method.token_budget(self.seen), int(protect.sum()))
        if n <= k or self._since_eviction < self.method.interval:
            return
        keep = self.method.select(self.scores, self.positions, k, protect.to(self.positions.device))
        idx = mask_to_indices(keep, k)
        self._keep(idx)
        self.positions = self.positions.gather(2, idx)
        self.valid = self.valid.gather(2, idx)
        if self.scores is not None:
            self.scores = self.scores.gather(2, idx)
            if self.method.reset_scores:
                self.scores.zero_()
        self._since_eviction = 0

    # -- transformers' layer API: tokens seen for positions, kept tokens for the mask --

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        kept = self._kept() if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def kept_length(self) -> int:
        return self._kept() if self.is_initialized else 0

    def eviction_bytes(self) -> int:
        return _nbytes(self.scores) + _nbytes(self.positions) + _nbytes(self.valid)


def _scorer(query: torch.Tensor, key: torch.Tensor, mask):
    """The Triton kernel (kvlab.kernels.scored_attention) on CUDA where it applies, else the reference."""
    if query.is_cuda and importlib.util.find_spec("triton") is not None:
        from kvlab.kernels.scored_attention import scored_attention_triton, supported

        if supported(query, key, mask):
            return scored_attention_triton
    return scored_attention


def scored_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None, first_row: int = 0,
                     query_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and the attention mass each key receives, in one pass over query-row chunks.

    ``query`` [B, Hq, q, D]; ``key``/``value`` [B, Hkv, N, D] (the last q keys are the queries' own).
    Returns the output as transformers' attention functions do ([B, q, Hq, D]) and the mass
    [B, Hkv, N] (float32) received from query rows ``>= first_row``, summed over the query heads
    of each GQA group: column sums of the softmax matrix, never built whole. ``attention_mask`` is
    [B|1, 1|Hkv, q, >=N] (bool or additive); rows where ``query_valid`` [B, q] is False (padding)
    add no mass.
    """
    B, Hq, q, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    g = Hq // Hkv
    scale = scaling if scaling is not None else D**-0.5
    qg = query.view(B, Hkv, g, q, D)
    kt = key.unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, N]
    v = value.unsqueeze(2)
    out = torch.empty_like(qg)
    mass = torch.zeros(B, Hkv, N, device=query.device, dtype=torch.float32)
    cols = torch.arange(N, device=query.device)
    for r0 in range(0, q, CHUNK_ROWS):
        r1 = min(q, r0 + CHUNK_ROWS)
        logits = torch.matmul(qg[:, :, :, r0:r1], kt).float() * scale  # [B, Hkv, g, r, N]
        if attention_mask is None:
            rows = torch.arange(r0, r1, device=query.device)
            logits = logits.masked_fill(cols > (N - q + rows)[:, None], float("-inf"))
        else:
            m = attention_mask[:, :, r0:r1, -N:].unsqueeze(2)  # [B|1, 1|Hkv, 1, r, N]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        p = logits.softmax(-1)
        out[:, :, :, r0:r1] = torch.matmul(p.to(value.dtype), v)
        if r1 > first_row:
            scoring = p[:, :, :, max(0, first_row - r0):]
            if query_valid is not None:
                scoring = scoring * query_valid[:, None, None, max(r0, first_row) : r1, None].to(p.dtype)
            mass += scoring.sum((2, 3))
    return out.view(B, Hq, q, D).transpose(1, 2).contiguous(), mass


class EvictionLayer(EvictionMixin, CompressedLayer):
    """Full-precision evicting layer: ``keys``/``values`` [B, H, kept, D] in the model's dtype."""

    is_croppable = False

    def __init__(self, method: EvictionMethod, layer_idx: int = 0):
        super().__init__()
        self.method, self.layer_idx = method, layer_idx
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._reset_eviction()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._track(key_states)
        self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], 2)
        self.values = value_states if self.values is None else torch.cat([self.values, value_states], 2)
        return self.keys, self.values

    def _kept(self) -> int:
        return self.keys.shape[2]

    def _protect(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.bool)

    def _keep(self, idx: torch.Tensor) -> None:
        full = idx.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, full), self.values.gather(2, full)

    def _apply(self, fn) -> None:
        self._apply_to(("keys", "values", "scores", "positions", "valid", "row_offset"), fn)

    def full_precision_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.keys, self.values) if self.is_initialized else ()

    def memory_bytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values) + self.eviction_bytes()


def kept_tokens(cache) -> float:
    """Tokens held per head, averaged over the cache's kvlab layers (tokens seen for non-evicting ones)."""
    layers = [layer for layer in cache.kv_layers() if layer.is_initialized]
    if not layers:
        return 0.0
    sizes = [layer.kept_length() if hasattr(layer, "kept_length") else layer.get_seq_length() for layer in layers]
    return sum(sizes) / len(sizes)
