"""Where a decode step's device time goes: the static decode path's kernels, grouped, and its weight matmuls.

Random bf16 weights in a real model's shapes (default Llama-3.1-8B), one prompt of ``--context``
tokens per row, then decode steps of ``kvlab``'s static path as deployed (decoder layers compiled,
the step replayed as a CUDA graph). Per method: the step's time (CUDA events over ``--steps``
replays), the profiler's device time per step by kernel group and the top kernels, and the
difference between the two (launch gaps and idle SMs between dependent kernels; kernels that
overlap count twice in the sum). With ``--matmuls``: every projection of the decoder layers (and
the LM head) timed alone at the batch size, over all layers' real weights in turn (so L2 holds
none of them), against the copy bandwidth measured in the same run; ``q+k+v`` and ``gate+up`` rows
time the same products with the weights concatenated (what a fused projection would read).

The attention of each layer is also broken down from the profiler's trace: device time per launch role (lean:
the one-warp programs; generic; the merge kernel; fp16: the dense kernel), and its span in the step, from the
first attention kernel's start to the last one's end (what the next kernel waits for), with one layer's
timeline. ``--variant NAME:GLOBAL=INT,...`` profiles the packed methods again with kernel launch overrides
(module globals of ``kvlab.kernels.decode_attention``, as in ``benchmarks/attention_ab.py``) in the same process.

    python benchmarks/step_profile.py --batch 16 --context 4096 --methods fp16 kivi-2 --matmuls
    python benchmarks/step_profile.py --methods kivi-2 --variant base --variant g2:N_GENERIC=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict

import torch
import torch.nn.functional as F
from attention_ab import overridden, parse_variant  # benchmarks/ is on sys.path when run as a script
from torch.profiler import ProfilerActivity, profile

import kvlab
from kvlab.generate import StaticDecoder, capacity, decoder_layers
from kvlab.kernels import decode_attention
from kvlab.methods import parse_method
from kvlab.models import cache_kwargs, load_model
from kvlab.projections import GROUPS as GROUPS_JOINED

GROUPS = (  # first match wins: (group, substrings of the kernel name)
    ("kvlab attention", ("_decode_kernel", "_dense_decode_kernel", "_combine_kernel")),
    ("kvlab cache update", ("_static_update_kernel", "_dense_append_kernel")),
    ("matmul (weights)", ("gemm", "gemv", "cutlass", "sm90_xmma", "ampere", "cublas", "nvjet")),
)
OTHER = "other (norms, RoPE, activations, copies, argmax)"


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return OTHER


def attention_timeline(trace: dict, steps: int) -> dict:
    """Per layer: device us of each attention launch role, and the attention's span in the step (from its first
    kernel's start to its last one's end; a layer's attention kernels are those between two other kernels)."""
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    lean_block = 32 * decode_attention.LEAN_WARPS
    two_roles = decode_attention.LEAN_WARPS != decode_attention.GENERIC_WARPS

    def role(e: dict) -> str | None:
        name = e["name"]
        if "_combine_kernel" in name:
            return "merge"
        if "_dense_decode_kernel" in name:
            return "fp16"
        if "_decode_kernel" in name:
            if not two_roles:
                return "lean+generic"
            return "lean" if e.get("args", {}).get("block", [0])[0] == lean_block else "generic"
        return None

    layers, layer = [], []
    for e in kernels:
        r = role(e)
        if r is not None:
            layer.append((r, e["ts"], e["dur"]))
        elif layer:
            layers.append(layer)
            layer = []
    if layer:
        layers.append(layer)
    if not layers:
        return {}
    totals: dict[str, float] = defaultdict(float)
    for lay in layers:
        for r, _, dur in lay:
            totals[r] += dur
    spans = [max(t + d for _, t, d in lay) - min(t for _, t, _ in lay) for lay in layers]
    middle = layers[len(layers) // 2]
    t0 = min(t for _, t, _ in middle)
    return {"layers_per_step": len(layers) / steps, "role_us": {r: v / len(layers) for r, v in totals.items()},
            "span_us": statistics.mean(spans), "span_median_us": statistics.median(spans),
            "one_layer": [{"role": r, "start_us": t - t0, "us": d} for r, t, d in middle]}


def graph_ms(fn, repeats: int) -> float:
    """Milliseconds per call of ``fn`` (already warm), CUDA events around ``repeats`` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


@torch.inference_mode()
def profile_method(model, spec: str, batch: int, context: int, steps: int, top: int) -> dict:
    method = parse_method(spec)
    cache = kvlab.make_cache(method, model, max_length=capacity(method, context + 2 * steps + 4))
    ids = torch.randint(1000, (batch, context), device="cuda")
    first = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    last = torch.full((batch, 1), context - 1, device="cuda")
    decoder = StaticDecoder(model, cache, first, last, 2 * steps + 4, compile=True)
    for _ in range(decoder.WARMUP + 1):  # eager, compiled, recorded
        decoder.step()
    torch.cuda.synchronize()
    step_ms = graph_ms(decoder.step, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    decoder.finish()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            timeline = attention_timeline(json.load(f), steps)
    groups: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t and evt.key and not evt.key.startswith("ProfilerStep"):
            groups[group_of(evt.key)] += t / 1000 / steps
            kernels.append((t / steps, evt.count / steps, evt.key))
    kernels.sort(reverse=True)
    return {"method": spec, "batch": batch, "context": context, "step_ms": step_ms,
            "kernel_ms": sum(groups.values()), "groups": dict(groups), "attention": timeline,
            "top": [{"us": us, "calls": n, "kernel": k[:100]} for us, n, k in kernels[:top]]}


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes) of a 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / graph_ms(lambda: dst.copy_(src), 20) / 1e6


def _weights(model, name: str) -> list[torch.Tensor]:
    return [dict(layer.named_modules())[name].weight for layer in decoder_layers(model)]


@torch.inference_mode()
def matmul_table(model, batch: int) -> list[dict]:
    """Each projection alone, over every layer's weight in turn, recorded in one CUDA graph per projection."""
    names = [n for n, m in decoder_layers(model)[0].named_modules() if isinstance(m, torch.nn.Linear)]
    cases = [(n.rsplit(".", 1)[-1], _weights(model, n)) for n in names]
    cases.append(("lm_head", [model.get_output_embeddings().weight]))
    for parts in GROUPS_JOINED:  # what kvlab.projections joins
        full = [n for n in names if n.rsplit(".", 1)[-1] in parts]
        if len(full) == len(parts):
            label = "+".join(p.removesuffix("_proj") for p in parts)
            cases.append((label, [torch.cat(ws) for ws in zip(*(_weights(model, n) for n in full))]))
    rows = []
    for label, weights in cases:
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device="cuda") for w in weights}
        for w in weights:  # cuBLAS picks its kernels outside the capture
            F.linear(xs[w.shape[1]], w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in weights:
                F.linear(xs[w.shape[1]], w)
        graph.replay()
        us = 1000 * graph_ms(graph.replay, 10) / len(weights)
        nbytes = weights[0].numel() * weights[0].element_size()
        rows.append({"weights": label, "shape": list(weights[0].shape), "batch": batch, "us": us,
                     "gbps": nbytes / us / 1e3})
        del graph
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--methods", nargs="*", default=["fp16", "kivi-2", "kitty-pro"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per method")
    ap.add_argument("--matmuls", action="store_true", help="time each weight matmul alone too")
    ap.add_argument("--output", default=None, help="JSON results")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME[:GLOBAL=INT,...]: the packed methods again with these kernel launch overrides")
    args = ap.parse_args()
    if args.steps < 1 or args.top < 0 or min(args.batch) < 1:
        ap.error("--steps and --batch take integers >= 1, --top >= 0")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/step_profile.py needs a CUDA GPU")
    variants = [parse_variant(v) for v in args.variant] or [("default", decode_attention, {})]
    if any(module is not decode_attention for _, module, _ in variants):
        ap.error("--variant takes overrides only here (NAME:GLOBAL=INT,...): the step runs the installed kernel")
    model, _ = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    results: dict = {"copy_gbps": copy_gbps(), "steps": [], "matmuls": []}
    print(f"{args.model}, context {args.context}; copy bandwidth {results['copy_gbps']:.0f} GB/s")
    groups = [g for g, _ in GROUPS] + [OTHER]
    for batch in args.batch:
        if args.matmuls:
            for row in matmul_table(model, batch):
                results["matmuls"].append(row)
                print(f"  b={batch:<3d} {row['weights']:9s} {str(row['shape']):15s} {row['us']:8.1f} us "
                      f"{row['gbps']:6.0f} GB/s", flush=True)
        print(f"batch {batch}: ms per decode step" + "".join(f"{g[:20]:>21s}" for g in groups) + "  kernels  graph")
        for spec in args.methods:
            for name, _, overrides in (variants if spec != "fp16" else variants[:1]):
                try:
                    with overridden(decode_attention, overrides):
                        r = profile_method(model, spec, batch, args.context, args.steps, args.top)
                except Exception as e:  # noqa: BLE001  (a variant that does not launch: report it, go on)
                    print(f"  {spec} [{name}]: ERROR {e!r}", flush=True)
                    continue
                r["variant"] = name
                results["steps"].append(r)
                label = spec if len(variants) == 1 else f"{spec} [{name}]"
                print(f"  {label:28s}" + "".join(f"{r['groups'].get(g, 0.0):21.3f}" for g in groups)
                      + f"{r['kernel_ms']:9.3f}{r['step_ms']:7.3f}", flush=True)
                a = r["attention"]
                if a:
                    roles = ", ".join(f"{k} {v:.1f}" for k, v in a["role_us"].items())
                    print(f"      attention per layer ({a['layers_per_step']:.0f} per step): {roles} us; span "
                          f"{a['span_us']:.1f} us (median {a['span_median_us']:.1f}); one layer: "
                          + ", ".join(f"{k['role']} +{k['start_us']:.1f}/{k['us']:.1f}" for k in a["one_layer"]))
                for k in r["top"]:
                    print(f"      {k['us']:9.1f} us {k['calls']:5.0f}x  {k['kernel']}")
                torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
