"""CPU time of the emulated AxCore model vs the exact one, side by side in one process.

    python benchmarks/approx_speed.py [--model smollm2-135m] [--variants mpfpma+s+c axcore] [--tokens 1024]

One forward over the first ``--tokens`` tokens of WikiText-2 (best of ``--repeats``), exact fp32
first, then each variant applied to a copy of the model. ``axcore`` picks a format per tile from
the weights, and its cost depends on that choice (E1M2 tiles cost twice E2M1), so time it on the
real weights: it is calibrated like ``kvlab ppl --approx axcore`` (Moby Dick, tokens 4096-4608,
from ``KVLAB_DATA_DIR``). ``--model random:smollm2-135m`` times random weights (all tiles pick
E1M2 there: the worst case).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from kvlab import approx, data, models
from kvlab.cli import APPROX_GROUP_SIZE, CALIB_TOKENS


def timed_forward(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--variants", nargs="+", default=["mpfpma+s+c", "axcore"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(args.model)
    if tokenizer is None:
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        calib = ids[:, :256]
    else:
        ids = tokenizer(data.load_text("wikitext2"), return_tensors="pt").input_ids[:, : args.tokens]
        book = tokenizer(data.load_text("pg19:moby_dick"), return_tensors="pt").input_ids
        calib = book[:, CALIB_TOKENS[0] : CALIB_TOKENS[1]]
    exact = timed_forward(model, ids, args.repeats)
    print(f"{args.model}, {args.tokens} tokens, {args.threads} thread(s): exact fp32 {exact:.2f} s")
    for variant in args.variants:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        approx.apply(m, variant, group_size=APPROX_GROUP_SIZE, calib=calib)
        setup = time.perf_counter() - t
        took = timed_forward(m, ids, args.repeats)
        print(f"{variant}: {took:.2f} s forward ({took / exact:.2f}x exact), {setup:.1f} s apply")


if __name__ == "__main__":
    main()
