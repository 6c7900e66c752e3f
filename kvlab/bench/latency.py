"""Decode latency and throughput of KV caches (``kvlab bench latency``).

One run is one cache at one (batch, context): a seeded random prompt of ``context`` token ids per
row, prefilled as :class:`Prefill` says (one forward call by default), then ``gen_len`` greedy
decode steps through the cache. kvlab caches decode as ``kvlab.generate`` does: on CUDA, through
the static path (the step replayed as a CUDA graph, :mod:`kvlab.generate`; its decoder layers
compiled unless ``compile_layers`` is off) where the method has one, else (and on CPU) the plain
loop; the row's ``decode_path`` says which. Each step (forward + argmax) is timed on its own,
synchronized on CUDA; the first ``warmup`` steps are dropped. ``ms_per_token`` is the median of
the rest and ``tokens_per_s`` = ``batch * 1000 / ms_per_token`` (tokens of all sequences).

Rows (the ``rows`` of a ``"kind": "latency"`` result, see :mod:`kvlab.report`)::

    {"method", "batch", "context", "gen_len", "prefill_rows", "prefill_ms",
     "warmup_s" (untimed first steps: compilation, CUDA-graph recording), "ms_per_token",
     "ms_per_token_std", "tokens_per_s", "peak_memory_mb" (None on CPU), "cache_bytes",
     "bits_per_value_all_in", ...}
    {"method", "batch", "context", "oom": true, "error": str}   # ran out of memory
    {"method", "batch", "context", "skipped": str}               # cannot run here (the reason)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvlab.generate import StaticDecoder
from kvlab.models import cache_kwargs, free_memory, is_oom
from kvlab.static import static_reason

HF_BASELINES = ("hf-dynamic", "hf-static-compiled", "hf-quanto-2", "hf-quanto-4")
PROBE_STEPS = 2  # decode steps per --find-max-batch probe (after the prefill)
MAX_PROBE_BATCH = 8192  # --find-max-batch stops doubling here
WARM_CONTEXT = 2048  # prompt tokens of each case's untimed first run


@dataclass(frozen=True)
class Prefill:
    """How a run's prompt is prefilled: in chunks of ``chunk`` tokens (None: one forward call), so that
    prefill activations do not decide what fits; for ``rows`` distinct sequences whose cache rows are then
    repeated up to the batch (None: every row its own). A decode step costs the same whatever the cache
    holds, so ``rows=1`` times the same steps at a large batch and long context for a fraction of the
    prefill (``prefill_ms`` then covers ``rows`` sequences)."""

    chunk: int | None = None
    rows: int | None = None


@dataclass(frozen=True)
class Case:
    """One cache to time. ``new_cache(model, max_length)`` builds it; ``compiled``: decode steps go
    through ``torch.compile(model.forward, mode="reduce-overhead")``; ``skipped``: why it cannot run;
    ``baseline``: a failure other than out-of-memory is recorded instead of raised; ``static``:
    kvlab's static decode path where the cache has one, with the decoder layers compiled if
    ``compile_layers``; ``repeatable``: its batch rows can be repeated after the prefill
    (``Prefill.rows``)."""

    label: str
    new_cache: Callable[[Any, int], Any] | None = None
    compiled: bool = False
    skipped: str | None = None
    baseline: bool = False
    static: bool = False
    compile_layers: bool = False
    repeatable: bool = True


def method_case(method, compile_layers: bool = True) -> Case:
    """A kvlab method's cache, preallocated for the whole run (fused Triton kernels on CUDA)."""
    from kvlab.cache import make_cache
    from kvlab.generate import capacity

    return Case(method.label, lambda model, n: make_cache(method, model, max_length=capacity(method, n)), static=True,
                compile_layers=compile_layers)


def hf_cases(device: torch.device) -> list[Case]:
    """transformers' own caches: dynamic, static with a compiled decode step, quanto at 2 and 4 bits."""
    from transformers.cache_utils import DynamicCache, QuantizedCache, StaticCache

    try:
        import optimum.quanto  # noqa: F401

        no_quanto = None
    except ImportError as e:
        no_quanto = f"optimum.quanto is not importable ({e}); pip install optimum-quanto"
    return [
        Case("hf-dynamic", lambda model, n: DynamicCache(config=model.config), baseline=True),
        Case("hf-static-compiled", lambda model, n: StaticCache(config=model.config, max_cache_len=n), compiled=True,
             baseline=True, repeatable=False, skipped=None if device.type == "cuda" else
             "torch.compile mode='reduce-overhead' records CUDA graphs: CUDA only"),
        # transformers' static layers cannot repeat rows; its quantized layers would repeat only their fp16 part
        *(Case(f"hf-quanto-{bits}", lambda model, n, bits=bits: QuantizedCache("quanto", model.config, nbits=bits),
               baseline=True, repeatable=False, skipped=no_quanto) for bits in (2, 4)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def cache_size(cache, config, batch: int, tokens: int) -> dict[str, Any]:
    """Bytes held by ``cache`` and bits per cached value: kvlab caches measure themselves
    (``stats()``); transformers' caches are summed tensor by tensor (quanto tensors included)."""
    if hasattr(cache, "stats"):
        stats = cache.stats()
    else:
        from kvlab.methods.hf_quanto import _tensor_bytes

        nbytes = sum(_tensor_bytes(getattr(layer, name, None)) for layer in cache.layers
                     for name in ("keys", "values", "_quantized_keys", "_quantized_values"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        values = 2 * batch * kv_heads * head_dim * config.num_hidden_layers * tokens
        stats = {"cache_bytes": nbytes, "bits_per_value_all_in": 8 * nbytes / values}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}


@torch.no_grad()
def measure(model, case: Case, batch: int, context: int, gen_len: int, warmup: int, seed: int = 0,
            prefill: Prefill = Prefill()) -> dict:
    """Prefill + ``gen_len`` timed greedy decode steps of ``case``'s cache; one result row."""
    device = model.device
    config = model.config.get_text_config(decoder=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = min(batch, prefill.rows or batch)
    ids = torch.randint(config.vocab_size, (rows, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    cache = case.new_cache(model, context + gen_len)
    step = model
    if case.compiled or case.compile_layers:
        torch._dynamo.reset()  # a fresh graph for this batch and cache size
    if case.compiled:
        step = torch.compile(model.forward, mode="reduce-overhead")

    _sync(device)
    t0 = time.perf_counter()
    chunk = prefill.chunk or context
    for start in range(0, context, chunk):
        logits = model(input_ids=ids[:, start : start + chunk], **cache_kwargs(model, cache), use_cache=True,
                       logits_to_keep=1).logits
    next_ids = logits[:, -1:].argmax(-1)
    _sync(device)
    prefill_ms = 1000 * (time.perf_counter() - t0)
    if rows < batch:
        repeats = -(-batch // rows)
        cache.batch_repeat_interleave(repeats)
        next_ids = next_ids.repeat_interleave(repeats, dim=0)
        if rows * repeats > batch:
            cache.batch_select_indices(torch.arange(batch, device=device))
            next_ids = next_ids[:batch]

    times = []
    decoder = None
    if case.static and static_reason(cache) is None:
        last = torch.full((batch, 1), context - 1, device=device)
        decoder = StaticDecoder(model, cache, next_ids, last, gen_len, compile=case.compile_layers)
    try:
        for _ in range(gen_len):
            t0 = time.perf_counter()
            if decoder is not None:
                decoder.step()
            else:
                if case.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                # the keyword from the model, not from step (a compiled forward takes *args, **kwargs)
                next_ids = step(input_ids=next_ids, **cache_kwargs(model, cache),
                                use_cache=True).logits[:, -1:].argmax(-1)
            _sync(device)
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        if decoder is not None:  # the model's projections apart again, whatever happened
            decoder.finish()

    if decoder is None:
        path = "compiled" if case.compiled else "eager"
    else:
        path = ("cuda-graph" if decoder.use_graph else "static") + ("+compiled-layers" if decoder.compiled else "")
    timed = times[warmup:]
    ms = statistics.median(timed)
    return {
        "method": case.label, "batch": batch, "context": context, "gen_len": gen_len, "warmup": warmup,
        "decode_path": path, "prefill_rows": rows,
        "prefill_ms": prefill_ms, "warmup_s": sum(times[:warmup]) / 1000, "ms_per_token": ms,
        "ms_per_token_std": statistics.stdev(timed) if len(timed) > 1 else 0.0,
        "tokens_per_s": batch * 1000 / ms,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        **cache_size(cache, config, batch, context + gen_len),
    }


def run_case(model, case: Case, batch: int, context: int, gen_len: int, warmup: int, seed: int = 0,
             prefill: Prefill = Prefill()) -> dict:
    """``measure``, with out-of-memory (and a baseline's failure) recorded as a row; memory freed after."""
    key = {"method": case.label, "batch": batch, "context": context}
    if case.skipped:
        return {**key, "skipped": case.skipped}
    if not case.repeatable and (prefill.rows or batch) < batch:
        return {**key, "skipped": "cannot repeat prefilled rows (--prefill-rows): run it without"}
    attn = model.config._attn_implementation  # kvlab caches switch it on CUDA; each run starts from the same
    try:
        row = measure(model, case, batch, context, gen_len, warmup, seed, prefill)
    except Exception as e:
        if is_oom(e):
            row = {**key, "oom": True, "error": _first_line(e)}
        elif case.baseline:
            row = {**key, "skipped": f"failed: {_first_line(e)}"}
        else:
            raise
    # out of the except block: the traceback (and the tensors its frames hold) is gone
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    if case.compiled or case.compile_layers:
        torch._dynamo.reset()  # drops the compiled code (and CUDA graphs and their memory pool)
    free_memory(model.device)
    return row


def run_grid(model, cases: list[Case], batch_sizes: list[int], contexts: list[int], gen_len: int, warmup: int,
             seed: int = 0, on_row: Callable[[dict], None] | None = None,
             prefill: Prefill = Prefill()) -> list[dict]:
    """One row per (case, context, batch), batches ascending; once a batch runs out of memory, the
    larger ones at that context are recorded as out of memory without running. Each case first
    gets one untimed run at batch 1 and at most WARM_CONTEXT tokens, so one-time costs (Triton
    compilation, lazy kernel loading, Inductor's first compile) land in no row: on an H100 the
    first decode run of a process was seen 2-3x slower than the same run repeated."""
    rows = []
    for case in cases:
        if not case.skipped and not case.compiled:  # a compiled case compiles anew in each run anyway
            run_case(model, case, 1, min(*contexts, WARM_CONTEXT), gen_len, warmup, seed, prefill)
        for context in contexts:
            oom_at = None
            for batch in sorted(batch_sizes):
                if oom_at is None:
                    row = run_case(model, case, batch, context, gen_len, warmup, seed, prefill)
                    oom_at = batch if row.get("oom") else None
                else:
                    row = {"method": case.label, "batch": batch, "context": context, "oom": True,
                           "error": f"not run: batch {oom_at} already ran out of memory"}
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def find_max_batch(fits: Callable[[int], float | None], memory: float,
                   limit: int = MAX_PROBE_BATCH) -> tuple[int, list[list]]:
    """The largest batch ``b`` for which ``fits(b)`` returns the run's peak memory in bytes (None: out
    of memory). Peak memory grows about linearly with the batch (weights + batch x per-sequence cache
    and activations), but at batches 1 and 2 other transients can decide the peak, so every probe that
    fits refines the slope (from batch 1 to it) and predicts the batch that fills ``memory`` bytes; the
    next probe is that prediction (stepping up by 1, 2, 4, ... once a prediction is used up), or, after
    a probe that failed, the midpoint between the largest fit and the smallest failure. Each probe at a
    large batch prefills batch x context tokens, so the predictions save most of the time of plain
    doubling. Returns (batch, [[probed batch, fits], ...]); 0 when batch 1 does not fit, ``limit`` when
    nothing up to it fails."""
    probes: list[list] = []
    one = fits(1)
    probes.append([1, one is not None])
    if one is None or limit == 1:
        return (0 if one is None else 1), probes
    fit, peak, fail, slope = 1, one, None, 1.0
    b, step = 2, 1
    while True:
        got = fits(b)
        probes.append([b, got is not None])
        if got is None:
            fail = b
        else:
            fit, peak, slope = b, got, max((got - one) / (b - 1), 1.0)
        if fit >= limit or (fail is not None and fail - fit <= 1):
            return fit, probes
        predicted = fit + int((memory - peak) // slope)
        if got is None:
            b = (fit + fail) // 2
        elif predicted > fit:
            b = predicted if fail is None else min(predicted, fail - 1)
        else:  # the prediction is used up: step up
            b, step = fit + step, 2 * step
            if fail is not None:
                b = min(b, fail - 1)
        b = min(b, limit)


def at_max_batch(model, cases: list[Case], found: list[dict], gen_len: int, warmup: int, seed: int = 0,
                 prefill: Prefill = Prefill(), attempts: int = 4,
                 on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Each case timed at the largest batch ``max_batch_rows`` found for it (rows flagged ``at_max_batch``).
    The probes ran a few uncompiled steps; the timed run compiles the layers and records a CUDA graph, which
    may need more memory, so on running out the batch steps down, by 1/64 of it first and 4x more each time after
    (at most ``attempts`` runs): the margin is usually a row or two (a fixed 1/16 cost kitty-pro 11 of its 176 rows
    at 32K on an H200)."""
    by_label = {c.label: c for c in cases}
    rows = []
    for found_row in found:
        batch = found_row.get("max_batch") or 0
        if not batch:
            continue
        step = max(1, batch // 64)
        for _ in range(attempts):
            row = run_case(model, by_label[found_row["method"]], batch, found_row["context"], gen_len, warmup, seed,
                           prefill)
            if not row.get("oom") or batch == 1:
                break
            batch, step = max(1, batch - step), 4 * step
        rows.append({**row, "at_max_batch": True})
        if on_row:
            on_row(rows[-1])
    return rows


def usable_memory(device: torch.device) -> float:
    """Bytes the allocator could hold now: free device memory plus what PyTorch already holds."""
    free_memory(device)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device)


class _ProbeFailed(Exception):
    pass


def max_batch_rows(model, cases: list[Case], contexts: list[int], seed: int = 0,
                   on_probe: Callable[[str], None] | None = None, prefill: Prefill = Prefill()) -> list[dict]:
    """For each case and context, the largest batch whose prefill + PROBE_STEPS decode steps fit in memory
    (kvlab rows uncompiled: compiling the layers for every probe would cost more than the probes)."""
    rows = []
    for case in (replace(c, compile_layers=False) for c in cases):
        for context in contexts:
            if case.skipped or case.compiled:
                why = case.skipped or "not probed: each probe would compile and record new CUDA graphs"
                rows.append({"method": case.label, "context": context, "skipped": why})
                continue

            def fits(b: int, case=case, context=context) -> float | None:
                if on_probe:
                    on_probe(f"{case.label} ctx={context} batch={b}")
                row = run_case(model, case, b, context, PROBE_STEPS, 0, seed, prefill)
                if row.get("skipped"):  # a baseline failed for another reason than memory
                    raise _ProbeFailed(row["skipped"])
                return None if row.get("oom") else row["peak_memory_mb"] * 2**20

            try:
                best, probes = find_max_batch(fits, usable_memory(model.device))
            except _ProbeFailed as e:
                rows.append({"method": case.label, "context": context, "skipped": str(e)})
                continue
            rows.append({"method": case.label, "context": context, "max_batch": best,
                         "capped": best == MAX_PROBE_BATCH, "probes": probes})
    return rows
