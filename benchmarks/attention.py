"""Decode-attention time on a GPU: fp16 SDPA vs dequantize+SDPA vs kvlab's fused kernel.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one query
token per sequence, one layer. For each batch x context: correctness of the fused kernel
against the fp32 reference first, then triton.testing.do_bench medians, bytes the kernel
reads, achieved GB/s (and as a share of a measured device copy), speedup over fp16 SDPA; and
the quantize+pack time of a 128-token block as a share of a decode step.

    python benchmarks/attention.py [--cases 1x8192 8x32768] [--methods kivi-2 kitty-pro]

Every case is wrapped: an error is printed and the run goes on. JSON goes to $OUT/attention.json
when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
CASES = ["1x8192", "8x8192", "32x8192", "8x32768", "64x4096", "1x131072"]
METHODS = ["kivi-4", "kivi-2", "kitty-pro"]
CHECK_CASES = [(2, 8192 + 77), (1, 32768 + 5)]  # odd lengths: tails end mid-group


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """fp16 decode attention as transformers runs it for q_len 1: the GQA group as query rows."""
    B = q.shape[0]
    out = F.scaled_dot_product_attention(q.view(B, HKV, HQ // HKV, D), k, v, scale=scale)
    return out.view(B, 1, HQ, D)


def random_keys(B: int, L: int) -> torch.Tensor:
    """Keys with per-channel offsets and spreads (outlier channels), as post-RoPE keys have."""
    chan = torch.randn(1, HKV, 1, D, device="cuda") * 2
    spread = torch.rand(1, HKV, 1, D, device="cuda") * 3 + 0.2
    return (torch.randn(B, HKV, L, D, device="cuda") * spread + chan).to(DTYPE)


def filled_layer(method: str, B: int, L: int):
    """The method's layer after a prompt of L - 1 tokens and one decode step (so the prompt is flushed)."""
    from kvlab.methods import parse_method

    layer = parse_method(method).make_layer(0, D)
    for n in (L - 1, 1):
        layer.update(random_keys(B, n), torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE))
    return layer


def bench(fn) -> float:
    """Eager time per call (device events; includes the host's launch overhead when that dominates)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def bench_graph(fn, cold_l2: bool = False) -> float:
    """Device time per call: the call captured in a CUDA graph and replayed (no launch gaps).

    Without ``cold_l2``, replays run back to back and cases whose bytes fit in the L2 (50 MB on an H100 or
    H200) read partly from it, which a model's decode step, reading ~0.5 GB of weights between two layers'
    attention, does not. With it, a buffer of twice the L2 is zeroed before each replay, which is timed alone
    (CUDA events around it; median of 50)."""
    import triton

    fn()
    torch.cuda.synchronize()
    if not cold_l2:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(50):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e-3


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * n / t


def check(methods: list[str]) -> list[dict]:
    from kvlab.kernels import fused_attend
    from kvlab.kernels.reference import reference_attend

    rows = []
    for method in methods:
        for B, L in CHECK_CASES:
            try:
                layer = filled_layer(method, B, L)
                q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
                mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
                mask[0, ..., :13] = False  # left padding on row 0
                errs = []
                for m in (None, mask):
                    out = fused_attend(layer, q, m, D**-0.5)
                    ref = reference_attend(layer, q, m, D**-0.5, compute_dtype=torch.float32)
                    errs.append(((out.float() - ref).norm() / ref.norm()).item())
                ok = max(errs) < 1e-2
                rows.append({"method": method, "B": B, "L": L, "rel_err": errs[0], "rel_err_masked": errs[1], "ok": ok})
                print(f"check {method:10s} {B}x{L}: rel err {errs[0]:.2e}, left-padded {errs[1]:.2e}  "
                      f"{'OK' if ok else 'FAIL'}", flush=True)
            except Exception as e:  # noqa: BLE001  (report and go on)
                rows.append({"method": method, "B": B, "L": L, "error": repr(e)})
                print(f"check {method} {B}x{L}: ERROR {e!r}\n{traceback.format_exc(limit=4)}", flush=True)
            finally:
                torch.cuda.empty_cache()
    return rows


def run_case(B: int, L: int, methods: list[str], copy_bw: float, cold_l2: bool = False) -> list[dict]:
    from kvlab.kernels import fused_attend

    scale = D**-0.5
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    rows = []

    def record(name: str, fn, nbytes: int, **extra) -> None:
        eager = bench(fn)
        try:
            seconds = bench_graph(fn, cold_l2)
        except Exception as e:  # noqa: BLE001  (not capturable: report the eager time)
            print(f"{B}x{L} {name}: graph capture failed ({e!r}); eager time only", flush=True)
            seconds = eager
        rows.append({"case": f"{B}x{L}", "B": B, "L": L, "method": name, "us": seconds * 1e6,
                     "eager_us": eager * 1e6, "bytes": nbytes, "GBps": nbytes / seconds / 1e9,
                     "copy_frac": nbytes / seconds / copy_bw, **extra})

    try:
        k, v = random_keys(B, L), torch.randn(B, HKV, L, D, device="cuda", dtype=DTYPE)
        record("fp16-sdpa", lambda: sdpa_decode(q, k, v, scale), 2 * k.numel() * k.element_size())
        del k, v
    except Exception as e:  # noqa: BLE001
        print(f"{B}x{L} fp16-sdpa: ERROR {e!r}", flush=True)
    torch.cuda.empty_cache()

    for method in methods:
        try:
            layer = filled_layer(method, B, L)
            packed = layer.memory_bytes()
            if method == methods[0]:  # HF QuantizedCache-style: dequantize everything, then SDPA
                def dequant_sdpa():
                    keys, values = layer.dequantized()
                    return sdpa_decode(q, keys, values, scale)

                fp_bytes = 2 * B * HKV * L * D * 2
                record(f"dequant+sdpa ({method})", dequant_sdpa, packed + 2 * fp_bytes)
            record(method, lambda: fused_attend(layer, q, None, scale), packed)
            rows[-1].update(quant_pack_share(layer, B, rows[-1]["us"]))
            del layer
        except Exception as e:  # noqa: BLE001
            print(f"{B}x{L} {method}: ERROR {e!r}\n{traceback.format_exc(limit=4)}", flush=True)
        torch.cuda.empty_cache()

    base = next((r["us"] for r in rows if r["method"] == "fp16-sdpa"), None)
    for r in rows:
        r["speedup_vs_fp16"] = base / r["us"] if base else None
    return rows


def quant_pack_share(layer, B: int, step_us: float) -> dict:
    """Quantize+pack of one 128-token block of keys and of values, vs one decode-attention call."""
    from kvlab.kernels import quantize_pack_keys, quantize_pack_values

    x = random_keys(B, 128)
    both = lambda: (quantize_pack_keys(layer.key_codec, x), quantize_pack_values(layer.value_codec, x))  # noqa: E731
    t_graph = bench_graph(both)
    t_eager = bench(both)
    t_torch = bench(lambda: (layer.key_codec.encode(x), layer.value_codec.encode(x)))
    block_us = t_graph * 1e6
    return {"qpack_block_us": block_us, "qpack_block_eager_us": t_eager * 1e6,
            "qpack_block_pct_of_step": 100 * block_us / step_us, "qpack_torch_block_us": t_torch * 1e6}


def print_table(rows: list[dict]) -> None:
    print("\nus = device time (CUDA graph replay); eager = per call with launch overhead; "
          "qpack = quantize+pack of a 128-token key block + 128 value tokens (graph, eager)")
    print(f"{'case':>10} {'method':>22} {'us':>8} {'eager':>8} {'MB read':>8} {'GB/s':>6} {'%copy':>6} {'vs fp16':>8} "
          f"{'qpack us (% step) eager':>26}")
    for r in rows:
        sp = f"{r['speedup_vs_fp16']:.2f}x" if r.get("speedup_vs_fp16") else "-"
        qp = (f"{r['qpack_block_us']:.1f} ({r['qpack_block_pct_of_step']:.0f}%) {r['qpack_block_eager_us']:.0f}"
              if "qpack_block_us" in r else "")
        print(f"{r['case']:>10} {r['method']:>22} {r['us']:8.1f} {r['eager_us']:8.1f} {r['bytes'] / 1e6:8.1f} "
              f"{r['GBps']:6.0f} {100 * r['copy_frac']:5.0f}% {sp:>8} {qp:>26}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--cold-l2", action="store_true", help="flush the L2 before each timed replay (as in a model's step)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cold_l2": args.cold_l2}
    print(env, flush=True)
    result: dict = {"env": env}
    result["check"] = [] if args.no_check else check(args.methods)
    copy_bw = copy_bandwidth()
    result["copy_GBps"] = copy_bw / 1e9
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for case in args.cases:
        B, L = map(int, case.split("x"))
        t = time.perf_counter()
        try:
            case_rows = run_case(B, L, args.methods, copy_bw, args.cold_l2)
        except Exception as e:  # noqa: BLE001
            print(f"{case}: ERROR {e!r}\n{traceback.format_exc(limit=4)}", flush=True)
            case_rows = []
        rows += case_rows
        for r in case_rows:
            print(f"  {r['case']} {r['method']}: {r['us']:.1f} us, {r['GBps']:.0f} GB/s", flush=True)
        print(f"{case} done in {time.perf_counter() - t:.0f} s", flush=True)
        torch.cuda.empty_cache()
    result["rows"] = rows
    print_table(rows)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "attention.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
