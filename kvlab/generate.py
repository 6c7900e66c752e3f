"""``kvlab.generate``: greedy decoding through a kvlab cache, the decode step replayed as a CUDA graph.

    tokens = kvlab.generate(model, input_ids, cache="kitty-pro", max_new_tokens=256)

One prefill forward fills a cache preallocated for the whole generation; then
:func:`~kvlab.static.make_static` freezes it (fixed addresses, a per-step schedule on the
device) and :class:`StaticDecoder` records one decode step (forward, argmax, counters) in a
CUDA graph and replays it. No per-step allocation, host sync or Python in the loop. With
``compile=True`` the decoder layers run through ``torch.compile`` inside the recorded step, which
fuses the small kernels around the cache (RMSNorm, RoPE, SiLU-gating, residual adds); the cache's
update and attention stay kvlab's kernels, opaque custom ops in the compiled graph
(:mod:`kvlab.attention`). All layers share one compiled graph. Methods
without a static path (eviction, AQUA-KV, AxCore) and CPU models decode through
``model.generate`` with the same cache: same tokens, no graph. Output follows ``model.generate``
(greedy): ``[B, prompt + new]``, tokens after a row's EOS set to ``pad_token_id``, trailing
columns where every row has finished dropped.
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from kvlab.attention import static_step
from kvlab.cache import make_cache
from kvlab.methods import parse_method
from kvlab.models import cache_kwargs
from kvlab.projections import JoinedProjections
from kvlab.static import make_static, static_reason


def capacity(method, tokens: int) -> int:
    """Tokens to preallocate for ``tokens``: whole key groups (a static cache writes whole blocks)."""
    group = getattr(method, "group_size", 1)
    return -(-tokens // group) * group

def prompt_positions(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Position ids as ``model.generate`` makes them: counted from each row's first real token."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)

def greedy_tokens(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``logits [B, V]`` -> argmax ``[B, 1]``, first maximum on ties, in two passes: one GPU reduction over a
    128K vocabulary in a single row runs on few blocks (H200, batch 1: 36 us, most of it idle SMs)."""
    B, V = logits.shape
    if V <= 4 * chunk:
        return logits.argmax(-1, keepdim=True)
    pad = -V % chunk
    padded = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")) if pad else logits
    best, at = padded.view(B, -1, chunk).max(-1)
    which = best.argmax(-1, keepdim=True)
    return which * chunk + at.gather(1, which)

def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer`` modules)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class StaticDecoder:
    """Greedy decode steps over a frozen cache; ``step()`` runs one (graph replay on CUDA).

    ``tokens [B, 1]`` holds the token to feed next; ``out [B, steps + 1]`` collects the fed ones
    and the last prediction. Warm-up steps run on a side stream: the first eagerly (Triton
    compiles, cuBLAS sets up, the layer order of the cache ops is checked), the second through the
    compiled layers when ``compile`` (dynamo traces, Inductor compiles); then one step is recorded
    and replayed for the rest. Projections that read one input run as one matmul
    (:mod:`kvlab.projections`: the model's parameters are views of the joined weights until
    :meth:`finish`). The model is otherwise left as it was: compiled layers and joined parts are
    swapped in only for the steps that run Python.
    """

    WARMUP = 2

    def __init__(self, model, cache, first_token: torch.Tensor, last_position: torch.Tensor, steps: int,
                 attention_mask: torch.Tensor | None = None, cuda_graph: bool = True, compile: bool = False):
        self.model, self.cache, self.steps = model, cache, steps
        self.counter = make_static(cache, model, steps, attention_mask)
        self.tokens = first_token.clone()
        self.position = (last_position + 1).clone()
        self.out = first_token.new_empty(first_token.shape[0], steps + 1)
        self.out[:, :1] = first_token
        self.done = 0
        self.finished = False
        self.graph = None
        self.use_graph = cuda_graph and first_token.is_cuda and steps > self.WARMUP
        layers = decoder_layers(model)
        self.joined = JoinedProjections(layers)
        self.compiled = []
        if compile:
            self.compiled = [(m, torch.compile(m.forward, fullgraph=True)) for m in layers]
            if not self.compiled:
                raise ValueError(f"compile=True: {type(model).__name__} has no transformers decoder layers to compile")

    def _forward(self) -> None:
        compiled = self.compiled if self.done else []  # the first step runs eagerly
        for module, forward in compiled:
            module.forward = forward
        try:
            with self.joined.swapped(), static_step(self.cache.layers):
                logits = self.model(input_ids=self.tokens, position_ids=self.position,
                                    **cache_kwargs(self.model, self.cache), use_cache=True).logits
        finally:
            for module, _ in compiled:
                del module.forward
        self.tokens.copy_(greedy_tokens(logits[:, -1]))
        self.out.index_copy_(1, self.counter.long() + 1, self.tokens)
        self.position.add_(1)
        self.counter.add_(1)

    def step(self) -> None:
        if self.finished:
            raise RuntimeError("this decoder has finished: its model's projections are apart again")
        if self.done >= self.steps:
            raise RuntimeError(f"the cache was frozen for {self.steps} decode steps")
        if not self.use_graph:
            self._forward()
        elif self.done < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._forward()
            self.graph.replay()
        self.done += 1

    def finish(self) -> torch.Tensor:
        """Host-side lengths brought up to date, the model's parameters apart again (no more steps); returns the
        tokens so far ``[B, done + 1]``."""
        if not self.finished:
            self.graph = None  # it reads the joined weights
            self.joined.restore()
            for layer in self.cache.layers:
                layer.finish(self.done)
            self.finished = True
        return self.out[:, : self.done + 1]

def _stop_at_eos(new: torch.Tensor, eos_token_id, pad_token_id: int) -> torch.Tensor:
    if eos_token_id is None:
        return new
    eos = torch.as_tensor(eos_token_id, device=new.device).view(-1)
    hit = torch.isin(new, eos)
    after = (hit.cumsum(1) - hit.long()) > 0  # strictly after the first EOS
    new = new.masked_fill(after, pad_token_id)
    running = (~after).any(0).nonzero()
    return new[:, : int(running.max()) + 1]

@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cache="fp16", *, max_new_tokens: int = 128,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, cuda_graph: bool = True, compile: bool = True) -> torch.Tensor:
    """Greedy generation with a kvlab cache (a method spec like ``"kivi-2"`` or a Method).

    ``input_ids [B, P]`` (left padding with ``attention_mask``); returns ``[B, P + new]``.
    ``compile``: the static path's decoder layers run compiled (:class:`StaticDecoder`): 1.2x faster
    steps on an H100 (Llama-3.1-8B shapes); the first call per batch size pays dynamo's trace and
    Inductor's compile (cached on disk after the first time); ``compile=False`` skips both.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt length > 0], got {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    method = parse_method(cache) if isinstance(cache, str) else cache
    kv = make_cache(method, model, max_length=capacity(method, P + max_new_tokens))
    positions = prompt_positions(attention_mask, B, P, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   **cache_kwargs(model, kv), use_cache=True, logits_to_keep=1).logits
    first = greedy_tokens(logits[:, -1])
    if max_new_tokens > 1 and static_reason(kv) is None:
        decoder = StaticDecoder(model, kv, first, positions[:, -1:], max_new_tokens - 1, attention_mask, cuda_graph,
                                compile)
        try:
            for _ in range(max_new_tokens - 1):
                decoder.step()
        finally:
            new = decoder.finish()
    else:
        new = _dynamic_decode(model, kv, first, positions[:, -1:], attention_mask, max_new_tokens - 1)
    return torch.cat([input_ids, _stop_at_eos(new, eos_token_id, pad_token_id)], dim=1)

def _dynamic_decode(model, kv, first: torch.Tensor, last_position: torch.Tensor,
                    attention_mask: torch.Tensor | None, steps: int) -> torch.Tensor:
    """The plain loop (CPU, methods without a static path): one forward per token through ``kv``."""
    tokens, position = [first], last_position
    mask = attention_mask
    for _ in range(steps):
        position = position + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=tokens[-1], attention_mask=mask, position_ids=position, **cache_kwargs(model, kv),
                       use_cache=True).logits
        tokens.append(greedy_tokens(logits[:, -1]))
    return torch.cat(tokens, dim=1)
