"""kvlab's static decode path with and without ``torch.compile`` of the decoder layers, side by side.

Same protocol as ``kvlab bench latency`` (:mod:`kvlab.bench.latency`): random-weight model, random
prompt, median ms per decode step after warm-up; every case runs in this one process, alternating.

    python benchmarks/compile_ab.py --model random:llama-3.1-8b --methods fp16 kivi-2 --batch-sizes 1 16
"""

import argparse
import json

import torch

from kvlab.bench import latency as lat
from kvlab.methods import parse_method
from kvlab.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--methods", nargs="+", default=["fp16", "kivi-2", "kitty-pro"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--output", default=None, help="JSON rows")
    args = ap.parse_args()
    model, _ = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    rows = []
    for spec in args.methods:
        method = parse_method(spec)
        for batch in args.batch_sizes:
            for compiled in (False, True):
                case = lat.method_case(method, compile_layers=compiled)
                row = lat.run_case(model, case, batch, args.context, args.gen_len, args.warmup)
                rows.append(row)
                print(f"{spec:10s} b={batch:<3d} compiled layers={compiled!s:5s} {row.get('decode_path', '')}: "
                      f"{row.get('ms_per_token', float('nan')):.2f} ms/step "
                      f"({row.get('tokens_per_s', float('nan')):.0f} tokens/s) {row.get('error', '')}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
