"""Triton AxCore GEMM under TRITON_INTERPRET=1 (a subprocess, so the flag is set before
triton is imported), compared bit for bit with a sequential-fp16 reference built from the
CPU emulation's products."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

SCRIPT = textwrap.dedent(
    """
    import torch
    from kvlab.approx import FORMATS, multipliers, quantize_weight
    from kvlab.approx.select import _assemble
    from kvlab.approx.triton_gemm import triton_approx_matmul

    def reference(x, w, mults):
        m, (n, k) = x.shape[0], w.codes.shape
        out = torch.zeros(m, n)
        for gi, k0 in enumerate(range(0, k, w.group_size)):
            fmt = w.row_formats(gi).long()
            acc = torch.zeros(m, n, dtype=torch.float16)
            for kk in range(k0, min(k0 + w.group_size, k)):
                prods = torch.stack([mu(x[:, kk, None], w.codes[None, :, kk]) for mu in mults])
                acc = acc + torch.gather(prods, 0, fmt.expand(m, n)[None])[0]
            out += acc * w.scales[:, gi]
        return out.half()

    g = torch.Generator().manual_seed(0)
    for variant in ("fp4-exact", "mpfpma", "mpfpma+s", "mpfpma+s+c", "axcore"):
        for (m, k, n, group) in ((5, 40, 20, 16), (3, 33, 9, 32)):
            x = (torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) ** 8 * 50).half()
            x[0, :3] = 0
            w = torch.randn(n, k, generator=g)
            if variant == "axcore":
                q = [quantize_weight(w, f, group, tile_rows=4) for f in FORMATS]
                tiles = torch.randint(0, 3, q[0].tile_formats.shape, generator=g).to(torch.uint8)
                qw = _assemble(q, tiles, group, 4)
            else:
                qw = quantize_weight(w, FORMATS[1], group)
            mults = multipliers(variant)
            got = triton_approx_matmul(x, qw, mults, block_m=4, block_n=8)
            want = reference(x, qw, mults)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (variant, m, k, n)
    print("OK")
    """
)


def test_triton_kernel_bit_exact_in_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
