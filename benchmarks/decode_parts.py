"""Where one fused decode-attention call spends its device time: the lean launch (packed tiles),
the generic launch (sinks, the key/value boundary zone, fp16 tails) and the merge kernel, by the profiler
(the merge kernel runs only where a pair has more than ``MERGE_PARTS`` partials; otherwise the last
program of each pair merges, inside the launches, and the column reads 0).

    python benchmarks/decode_parts.py [--methods kivi-2 kitty-pro] [--cases 16x4096 8x32768 64x4096]

Llama-3.1-8B attention shapes as in benchmarks/attention.py; means over 10 calls after 3 warm-up calls.
The generic launch runs on the current stream here, before the lean one (not beside it, as it does by
default), so each time is that launch's alone.
"""

from __future__ import annotations

import argparse

import torch
import torch.profiler as tp
from attention import DTYPE, HQ, D, filled_layer


def launch_times(method: str, B: int, L: int, calls: int = 10) -> dict[str, float]:
    from kvlab.kernels import decode_attention, fused_attend

    decode_attention.CONCURRENT_GENERIC = 0
    layer = filled_layer(method, B, L)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    for _ in range(3):
        fused_attend(layer, q, None, D**-0.5)
    torch.cuda.synchronize()
    with tp.profile(activities=[tp.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fused_attend(layer, q, None, D**-0.5)
        torch.cuda.synchronize()
    kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    decode = [t for name, t in kernels if "_decode_kernel" in name]  # generic, lean, generic, lean, ...
    if len(decode) != 2 * calls:
        raise RuntimeError(f"expected a lean and a generic launch per call, got {len(decode)} launches")
    merge = [t for name, t in kernels if "_combine_kernel" in name]
    return {"lean_us": sum(decode[1::2]) / calls, "generic_us": sum(decode[0::2]) / calls,
            "combine_us": sum(merge) / calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["kivi-2", "kitty-pro"])
    p.add_argument("--cases", nargs="+", default=["16x4096", "8x32768", "64x4096"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_parts.py needs a CUDA GPU")
    print(f"{'method':>10} {'case':>9} {'lean us':>8} {'generic us':>10} {'combine us':>10}")
    for method in args.methods:
        for case in args.cases:
            B, L = (int(x) for x in case.split("x"))
            t = launch_times(method, B, L)
            print(f"{method:>10} {case:>9} {t['lean_us']:8.1f} {t['generic_us']:10.1f} {t['combine_us']:10.1f}",
                  flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
