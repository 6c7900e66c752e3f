"""The Triton AxCore GEMM at Llama-3.1-8B layer shapes vs a bf16 matmul and a plain torch emulation.

For each (variant, shape): first a bit-exactness check of the Triton kernel against the CPU
emulation on a slice (the Multiplier products summed in the artifact's order: sequential fp16
per group, fp16 scale, fp32 across groups); then CUDA-event timings of the kernel and of
``torch.matmul`` in bf16 at M=2048 tokens; then the elementwise torch emulation on the GPU
(one fp16 product tensor per input channel, the same order), timed at full M over the first
input groups and extrapolated to all K (its cost is linear in K). Every case prints its own error and the run goes on. Needs CUDA + Triton.

    python benchmarks/approx_gemm_gpu.py [--tokens 2048] [--variants mpfpma+s+c axcore]
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable, Sequence

import torch

from kvlab.approx import FORMATS, FP4Weight, multipliers, quantize_weight
from kvlab.approx.mul import Multiplier
from kvlab.approx.select import _assemble

# Llama-3.1-8B: (name, N out, K in)
SHAPES = (("q/o_proj", 4096, 4096), ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336))
GROUP = 64


def make_weight(n: int, k: int, variant: str, device: str, seed: int = 0) -> FP4Weight:
    """E2M1 weights, or (``axcore``) random per-tile formats: timing does not depend on the choice."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    if variant != "axcore":
        return quantize_weight(w, FORMATS[1], GROUP)
    cands = [quantize_weight(w, f, GROUP) for f in FORMATS]
    tiles = torch.randint(0, 3, cands[0].tile_formats.shape, generator=g, device=device).to(torch.uint8)
    return _assemble(cands, tiles, GROUP, cands[0].tile_rows)


def sliced(w: FP4Weight, rows: int, device: str) -> FP4Weight:
    """The first ``rows`` output rows (a whole number of tiles) on ``device``."""
    tiles = -(-rows // w.tile_rows)
    return FP4Weight(w.codes[:rows].to(device), w.scales[:rows].to(device), w.tile_formats[:tiles].to(device),
                     w.group_size, w.tile_rows)


def elementwise(x: torch.Tensor, w: FP4Weight, mults: Sequence[Multiplier]) -> torch.Tensor:
    """Plain emulation in the artifact's order, one input channel at a time (any device)."""
    m, (n, k) = x.shape[0], w.codes.shape
    out = torch.zeros(m, n, device=x.device)
    for gi, k0 in enumerate(range(0, k, w.group_size)):
        fmt = w.row_formats(gi).long().expand(m, n)[None]
        acc = torch.zeros(m, n, dtype=torch.float16, device=x.device)
        for kk in range(k0, min(k0 + w.group_size, k)):
            prods = torch.stack([mu(x[:, kk, None], w.codes[None, :, kk]) for mu in mults])
            acc = acc + torch.gather(prods, 0, fmt)[0]
        out += (acc * w.scales[:, gi]).float()
    return out.half()


def cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (compilation)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def run_case(variant: str, name: str, n: int, k: int, tokens: int, args) -> dict:
    from kvlab.approx.triton_gemm import triton_approx_matmul

    mults = multipliers(variant)
    row = {"variant": variant, "shape": f"{name} {tokens}x{k}->{n}"}
    w = make_weight(n, k, variant, "cuda")
    x = (torch.randn(tokens, k, device="cuda") * 2).half()

    # 1. bit-exactness on a slice, against the CPU emulation
    xs, ws_cpu = x[: args.check_rows].cpu(), sliced(w, args.check_cols, "cpu")
    want = elementwise(xs, ws_cpu, mults)
    got = triton_approx_matmul(x[: args.check_rows], sliced(w, args.check_cols, "cuda"), mults).cpu()
    row["bit_exact"] = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))

    # 2. the kernel and bf16 at full size
    row["triton_ms"] = cuda_ms(lambda: triton_approx_matmul(x, w, mults), args.repeats)
    full = triton_approx_matmul(x, w, mults)
    row["full_slice_exact"] = bool(torch.equal(full[: args.check_rows, : args.check_cols].cpu(), got))
    xb, wb = x.bfloat16(), w.dequantize().bfloat16().T.contiguous()
    row["bf16_ms"] = cuda_ms(lambda: xb @ wb, args.repeats)

    # 3. elementwise torch emulation on GPU, the first input groups, extrapolated to all of K
    g = args.emulate_groups
    ke = g * GROUP
    we = FP4Weight(w.codes[:, :ke], w.scales[:, :g], w.tile_formats[:, :g], GROUP, w.tile_rows)
    elementwise(x[:, :ke], we, mults)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    elementwise(x[:, :ke], we, mults)
    torch.cuda.synchronize()
    row["torch_emulation_ms"] = (time.perf_counter() - t) * 1e3 * k / ke
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=["mpfpma+s+c", "axcore"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-rows", type=int, default=8)
    p.add_argument("--check-cols", type=int, default=64)
    p.add_argument("--emulate-groups", type=int, default=2, help="input groups of the timed torch emulation (extrapolated)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, M={args.tokens}, group {GROUP}")
    rows = []
    for variant in args.variants:
        for name, n, k in SHAPES:
            t = time.perf_counter()
            try:
                row = run_case(variant, name, n, k, args.tokens, args)
            except Exception as e:  # report and go on with the next case
                traceback.print_exc()
                row = {"variant": variant, "shape": f"{name} {args.tokens}x{k}->{n}", "error": f"{type(e).__name__}: {e}"}
            print(f"  {row['variant']} {row['shape']}: {time.perf_counter() - t:.1f} s", flush=True)
            rows.append(row)
    header = f"{'variant':<12} {'shape':<28} {'exact':>6} {'triton ms':>10} {'bf16 ms':>8} {'x bf16':>7} {'torch emu ms':>13} {'emu/triton':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<12} {r['shape']:<28} ERROR {r['error'][:80]}")
            continue
        exact = "yes" if r["bit_exact"] and r["full_slice_exact"] else "NO"
        print(f"{r['variant']:<12} {r['shape']:<28} {exact:>6} {r['triton_ms']:>10.2f} {r['bf16_ms']:>8.3f} "
              f"{r['triton_ms'] / r['bf16_ms']:>7.1f} {r['torch_emulation_ms']:>13.0f} "
              f"{r['torch_emulation_ms'] / r['triton_ms']:>10.1f}")
    print("\nexact: the kernel equals the CPU emulation bit for bit on a slice (and inside the full run);"
          " torch emu: elementwise emulation on the GPU, timed on --emulate-groups input groups and scaled to K")


if __name__ == "__main__":
    main()
