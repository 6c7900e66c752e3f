"""CPU time of the emulated AxCore model vs the exact one (SmolLM2-135M shape, 1024 tokens).

Weights are random (timing does not depend on them); the exact model runs in fp32.
    python benchmarks/approx_speed.py [--variants mpfpma+s+c axcore] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvlab import approx

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


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
    p.add_argument("--variants", nargs="+", default=["mpfpma+s+c", "axcore"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, args.tokens))
    exact = timed_forward(model, ids, args.repeats)
    print(f"exact fp32: {exact:.2f} s")
    for variant in args.variants:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        approx.apply(m, variant, group_size=args.group_size, calib=ids[:, :256])
        setup = time.perf_counter() - t
        took = timed_forward(m, ids, args.repeats)
        print(f"{variant}: {took:.2f} s forward ({took / exact:.2f}x exact), {setup:.1f} s apply")


if __name__ == "__main__":
    main()
