"""Where a decode step's device time goes: kernels of the static decode path grouped by kind.

Random bf16 weights in a real model's shapes (default Llama-3.1-8B), one prompt of ``--context``
tokens per row, then ``--steps`` decode steps of ``kvlab``'s static path run eagerly under the
PyTorch profiler (the same kernels the CUDA graph replays). Prints, per method, device
milliseconds per step by kernel group and the step's total device time.

    python benchmarks/step_profile.py --batch 16 --context 4096 --methods fp16 kivi-2 kitty-pro
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kvlab
from kvlab.generate import StaticDecoder, capacity
from kvlab.methods import parse_method
from kvlab.models import load_model

GROUPS = (  # first match wins: (group, substrings of the kernel name)
    ("kvlab attention", ("_decode_kernel", "_dense_decode_kernel", "_combine_kernel")),
    ("kvlab cache update", ("_static_update_kernel", "_dense_append_kernel")),
    ("matmul (weights)", ("gemm", "gemv", "cutlass", "sm90_xmma", "ampere", "cublas", "nvjet")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other (norms, RoPE, activations, copies, argmax)"


@torch.inference_mode()
def profile_method(model, spec: str, batch: int, context: int, steps: int) -> dict[str, float]:
    method = parse_method(spec)
    cache = kvlab.make_cache(method, model, max_length=capacity(method, context + steps + 2))
    ids = torch.randint(1000, (batch, context), device="cuda")
    first = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    last = torch.full((batch, 1), context - 1, device="cuda")
    decoder = StaticDecoder(model, cache, first, last, steps + 2, cuda_graph=False)
    decoder.step()  # compile and warm up outside the profile
    decoder.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t and evt.key and not evt.key.startswith("ProfilerStep"):
            totals[group_of(evt.key)] += t / 1000 / steps
    return dict(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--methods", nargs="+", default=["fp16", "kivi-2", "kitty-pro"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    model, _ = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    groups = [g for g, _ in GROUPS] + ["other (norms, RoPE, activations, copies, argmax)"]
    print(f"device ms per decode step, {args.model}, batch {args.batch} x context {args.context}")
    print(f"{'method':12s}" + "".join(f"{g:>22.22s}" for g in groups) + f"{'total':>10s}")
    for spec in args.methods:
        t = profile_method(model, spec, args.batch, args.context, args.steps)
        print(f"{spec:12s}" + "".join(f"{t.get(g, 0.0):22.2f}" for g in groups) + f"{sum(t.values()):10.2f}",
              flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
