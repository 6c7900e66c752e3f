"""GPU cost of AQUA-KV block compression at Llama-3.1-8B shapes (kvlab's PyTorch reference path).

One block = ``--block`` tokens written by every layer: un-rotate RoPE, predict from the previous
layer's reconstruction, Hadamard-rotate, nearest-grid search, bit-pack (``encode``); and the
reconstruction of one block for all layers, which the reference cache repeats on every read
(``decode``). Predictors are random (timing does not depend on their values), and so are the
grids, which skips the one-off grid construction (about a minute on CPU for n = 256).

Times are CUDA-event medians. The decode step is measured on a random-weight Llama-3.1-8B
(bf16, dense cache) unless ``--step-ms`` is given or the model does not fit; otherwise ~8 ms is
assumed. Usage::

    python benchmarks/aquakv_compress.py                  # H100: well under 2 minutes
    python benchmarks/aquakv_compress.py --device cpu --layers 2 --batch 1 --reps 2 --step-ms 8   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from kvlab.aquakv_cache import Rope
from kvlab.quant.higgs import HiggsQuantizer
from kvlab.quant.predictors import CrossLayerPredictors, LayerCodes, LayerKV, LinearPredictor
from kvlab.tables import fmt, format_table

ASSUMED_STEP_MS = 8.0


def random_predictors(layers: int, kv_heads: int, head_dim: int, d: int, n: int, group: int,
                      device: torch.device) -> CrossLayerPredictors:
    c = kv_heads * head_dim

    def linear(n_in: int) -> LinearPredictor:
        return LinearPredictor(torch.randn(c, n_in, device=device) / n_in**0.5, torch.randn(c, device=device) * 0.1)

    return CrossLayerPredictors(
        model_id="random:llama-3.1-8b", num_layers=layers, kv_heads=kv_heads, head_dim=head_dim,
        quantizer=HiggsQuantizer(d, n, group, grid=torch.randn(n, d, device=device)),
        first_layer_quantizer=HiggsQuantizer(2, 256, group, grid=torch.randn(256, 2, device=device)),
        key_predictors={l: linear(c) for l in range(1, layers)},
        value_predictors={l: linear(2 * c) for l in range(1, layers)},
    )


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds per call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object]) -> float:
    """Milliseconds the GPU spends in kernels during one call (the rest of the wall time is launch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def block_codec_ms(predictors: CrossLayerPredictors, rope: Rope, batch: int, block: int, start: int,
                   device: torch.device, reps: int) -> dict[str, float]:
    """Encode and decode ms for one block of ``block`` tokens through all layers (and GPU kernel ms)."""
    h, dh, layers = predictors.kv_heads, predictors.head_dim, predictors.num_layers
    keys = [torch.randn(batch, h, block, dh, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(batch, block, h * dh, device=device) for _ in range(layers)]
    positions = torch.arange(start, start + block, device=device)
    codes: list[LayerCodes] = []

    def encode() -> None:
        codes.clear()
        prev: LayerKV | None = None
        for layer in range(layers):
            rows = rope.remove(keys[layer].float(), positions).transpose(1, 2).flatten(2)
            layer_codes, prev = predictors.encode_layer(layer, rows, values[layer], prev)
            codes.append(layer_codes)

    def decode() -> None:
        prev: LayerKV | None = None
        for layer in range(layers):
            prev = predictors.decode_layer(layer, codes[layer], prev)
            rope.apply(prev.keys.unflatten(2, (h, dh)).transpose(1, 2), positions).to(torch.bfloat16)

    times = {"encode": timed(encode, device, reps), "decode": timed(decode, device, reps)}
    if device.type == "cuda":
        times["encode_kernels"] = kernel_ms(encode)
    return times


def decode_step_ms(batches: list[int], context: int, device: torch.device, reps: int) -> dict[int, float]:
    """One decode step of a random-weight Llama-3.1-8B (bf16) with a dense cache of ``context`` tokens."""
    from transformers import DynamicCache

    from kvlab.models import cache_kwargs, load_model

    model, _ = load_model("random:llama-3.1-8b", device=str(device), dtype=torch.bfloat16)
    steps = {}
    with torch.inference_mode():
        for batch in batches:
            cache = DynamicCache(config=model.config)
            model(torch.randint(0, 1000, (batch, context), device=device), **cache_kwargs(model, cache), use_cache=True,
                  logits_to_keep=1)
            step = torch.randint(0, 1000, (batch, 1), device=device)

            def one_step() -> None:
                model(step, **cache_kwargs(model, cache), use_cache=True)
                cache.crop(-1)  # keep the context length fixed across repetitions

            steps[batch] = timed(one_step, device, reps)
    del model, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="tokens per compressed block")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--edenn-d", type=int, default=2)
    p.add_argument("--edenn-n", type=int, default=16)
    p.add_argument("--hadamard-groupsize", type=int, default=1024)
    p.add_argument("--context", type=int, default=1024, help="cache length for the decode-step measurement")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=None, help="decode step time to compare with (skip measuring)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --device cpu for a smoke run")
    torch.manual_seed(0)
    rope = Rope(1.0 / (500000.0 ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)))
    predictors = random_predictors(args.layers, args.kv_heads, args.head_dim, args.edenn_d, args.edenn_n,
                                   args.hadamard_groupsize, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    c = args.kv_heads * args.head_dim
    print(f"{name}: {args.layers} layers, C = {c}, block = {args.block} tokens, "
          f"grid (d={args.edenn_d}, n={args.edenn_n}), Hadamard group {args.hadamard_groupsize}")
    note = ""
    if args.step_ms is not None:
        steps, note = dict.fromkeys(args.batch, args.step_ms), " (given)"
    else:
        try:
            steps = decode_step_ms(args.batch, args.context, device, max(5, args.reps // 2))
        except RuntimeError as e:  # no room for the 8B model (OutOfMemoryError is a RuntimeError)
            steps, note = dict.fromkeys(args.batch, ASSUMED_STEP_MS), f"  (step assumed: {type(e).__name__})"
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            t = block_codec_ms(predictors, rope, batch, args.block, args.context, device, args.reps)
            rows.append({"batch": batch, **t, "step": steps[batch],
                         "of_step": 100 * t["encode"] / ASSUMED_STEP_MS,
                         "amortised": 100 * t["encode"] / ASSUMED_STEP_MS / args.block,
                         "of_measured": 100 * t["encode"] / steps[batch]})
    print(format_table(rows, [
        ("batch", "batch", str), ("encode", "encode ms/block", fmt(".2f")),
        ("encode_kernels", "of which GPU kernels", fmt(".2f")), ("decode", "decode ms/block", fmt(".2f")),
        ("of_step", f"encode % of {ASSUMED_STEP_MS:g} ms step", fmt(".1f")),
        ("amortised", f"per step, amortised over {args.block}", fmt(".2f")),
        ("step", "measured step ms" + note, fmt(".2f")), ("of_measured", "encode % of measured", fmt(".1f")),
    ]))
    print(f"One block is written every {args.block} decode steps, hence 'amortised'. The reference cache also "
          "rebuilds every cached block on every read: 'decode' is paid per cached block per step.")


if __name__ == "__main__":
    main()
