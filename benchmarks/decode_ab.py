"""kvlab's static decode path with one feature off and on, side by side in one process.

``--toggle compile``: the decoder layers run through ``torch.compile`` or eagerly (inside the CUDA graph either
way); ``--toggle joined``: projections that read one input are one matmul (:mod:`kvlab.projections`) or apart
(their groups emptied for the "off" runs). Same protocol as ``kvlab bench latency`` (:mod:`kvlab.bench.latency`):
random-weight model, random prompt, median ms per decode step after warm-up; cases alternate.

    python benchmarks/decode_ab.py --toggle joined --methods fp16 kivi-2 --batch-sizes 1 16
"""

import argparse
import json

import torch

from kvlab import projections
from kvlab.bench import latency as lat
from kvlab.methods import parse_method
from kvlab.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toggle", choices=["compile", "joined"], required=True)
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--methods", nargs="+", default=["fp16", "kivi-2", "kitty-pro"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--output", default=None, help="JSON rows")
    args = ap.parse_args()
    if args.gen_len <= args.warmup or args.warmup < 0 or min(args.batch_sizes) < 1:
        ap.error("--gen-len must exceed --warmup (>= 0) and --batch-sizes take integers >= 1")
    model, _ = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    groups = projections.GROUPS
    rows = []
    for spec in args.methods:
        method = parse_method(spec)
        for batch in args.batch_sizes:
            for on in (False, True):
                projections.GROUPS = groups if on or args.toggle != "joined" else ()
                case = lat.method_case(method, compile_layers=on or args.toggle != "compile")
                row = lat.run_case(model, case, batch, args.context, args.gen_len, args.warmup)
                row[args.toggle] = on
                rows.append(row)
                print(f"{spec:10s} b={batch:<3d} {args.toggle}={on!s:5s} {row.get('decode_path', '')}: "
                      f"{row.get('ms_per_token', float('nan')):.3f} ms/step "
                      f"({row.get('tokens_per_s', float('nan')):.0f} tokens/s) {row.get('error', '')}", flush=True)
    projections.GROUPS = groups
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
