"""Decode-attention calls to put under Nsight Compute (hardware counters of the packed kernel).

    ncu --clock-control none -k regex:_decode_kernel --launch-skip 2 --launch-count 1 --set full \
        python benchmarks/ncu_decode.py kivi-2 8x32768

Builds the method's layer as benchmarks/attention.py does (Llama-3.1-8B attention shapes) and
calls the fused kernel four times (the first compiles).
"""

from __future__ import annotations

import sys

import torch

from attention import D, DTYPE, HQ, filled_layer


def main() -> None:
    method, case = sys.argv[1], sys.argv[2]
    B, L = (int(x) for x in case.split("x"))
    from kvlab.kernels import fused_attend

    layer = filled_layer(method, B, L)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    for _ in range(4):
        fused_attend(layer, q, None, D**-0.5)
    torch.cuda.synchronize()
    print(f"{method} {case}: {layer.memory_bytes() / 1e6:.1f} MB packed")


if __name__ == "__main__":
    main()
