"""Variants of the fused decode-attention kernel side by side, in one process, on the same layers.

A variant is this checkout's kernel with tuning overrides (module globals of
``kvlab.kernels.decode_attention``), or another commit's kernel file with its own defaults:

    git show 94d93e1:kvlab/kernels/decode_attention.py > /tmp/before.py
    python benchmarks/attention_ab.py --cases 8x32768 16x4096 --methods kivi-2 kitty-pro \\
        --variant before=/tmp/before.py --variant new --variant r168:LEAN_MAXNREG=168 --variant serial:CONCURRENT_GENERIC=0

``NAME[=FILE][:GLOBAL=INT,...]``. Each variant is checked against the fp32 reference and timed twice
by CUDA-graph replay (the better of the two is reported, both go to the JSON), next to fp16 SDPA.
Shapes as in benchmarks/attention.py. JSON goes to $OUT/attention_ab.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from attention import DTYPE, HKV, HQ, D, bench_graph, filled_layer, random_keys, sdpa_decode


def parse_variant(spec: str) -> tuple[str, ModuleType, dict[str, int]]:
    import kvlab.kernels.decode_attention as current

    current.apply_tuning_overrides()  # the environment's first: a variant's overrides go on top and stay
    head, _, overrides = spec.partition(":")
    name, _, path = head.partition("=")
    module = current
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"--variant {spec}: no file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"decode_attention_{name}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(module, key):
            raise SystemExit(f"--variant {spec}: the kernel module has no {key}")
        try:
            values[key] = int(value)
        except ValueError:
            raise SystemExit(f"--variant {spec}: {key} takes an integer, not {value!r}") from None
    return name, module, values


@contextlib.contextmanager
def overridden(module: ModuleType, overrides: dict[str, int]) -> Iterator[None]:
    """The module's globals set to ``overrides`` inside the block, restored after it."""
    saved = {key: getattr(module, key) for key in overrides}
    try:
        for key, value in overrides.items():
            setattr(module, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def time_variant(module: ModuleType, overrides: dict[str, int], layer, q: torch.Tensor, ref: torch.Tensor,
                 cold_l2: bool) -> dict:
    with overridden(module, overrides):
        out = module.fused_attend(layer, q, None, D**-0.5)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        times = [bench_graph(lambda: module.fused_attend(layer, q, None, D**-0.5), cold_l2) * 1e6 for _ in range(2)]
        return {"us": min(times), "us_runs": times, "rel_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["8x32768", "16x4096", "64x4096", "1x131072"])
    p.add_argument("--methods", nargs="+", default=["kivi-2", "kitty-pro"])
    p.add_argument("--variant", action="append", required=True, help="NAME[=FILE][:GLOBAL=INT,...]")
    p.add_argument("--cold-l2", action="store_true", help="flush the L2 before each timed replay (as in a model's step)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_ab.py needs a CUDA GPU")
    from kvlab.kernels.reference import reference_attend

    variants = [parse_variant(v) for v in args.variant]
    torch.manual_seed(0)
    rows = []
    for case in args.cases:
        B, L = (int(x) for x in case.split("x"))
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        k, v = random_keys(B, L), torch.randn(B, HKV, L, D, device="cuda", dtype=DTYPE)
        sdpa_us = bench_graph(lambda: sdpa_decode(q, k, v, D**-0.5), args.cold_l2) * 1e6
        del k, v
        for method in args.methods:
            layer = filled_layer(method, B, L)
            ref = reference_attend(layer, q, None, D**-0.5, compute_dtype=torch.float32)
            line = f"{case:>9} {method:>10}  fp16 SDPA {sdpa_us:7.1f} us |"
            for name, module, overrides in variants:
                r = time_variant(module, overrides, layer, q, ref, args.cold_l2)
                rows.append({"case": case, "method": method, "variant": name, "sdpa_us": sdpa_us, **r})
                line += f" {name} {r['us']:7.1f} ({sdpa_us / r['us']:.2f}x, err {r['rel_err']:.1e})"
            print(line, flush=True)
            del layer
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention_ab.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "variants": args.variant, "cold_l2": args.cold_l2,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
