"""Registers, spills and the SASS instruction mix of the decode kernel's main loop, without a GPU.

Compiles ``_decode_kernel`` for sm_90 (H100/H200) with the Triton of the GPU machine, offline, in
Llama-3.1-8B decode shapes (GQA 4, head_dim 128, one query token, key group 128), then disassembles
it with the ``ptxas`` and ``cuobjdump`` that Triton's wheel ships:

    pip download --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_27_x86_64 -d /tmp/w triton==3.6.0
    python -m zipfile -e /tmp/w/triton-3.6.0-*.whl /tmp/t36 && chmod +x /tmp/t36/triton/backends/nvidia/bin/*
    PYTHONPATH=/tmp/t36 python benchmarks/sass_stats.py --bits 2 [--boost 25] [--role lean|generic] [--maxnreg N]
        [--tile 128] [--loads]

Loops are backward branches' bodies, largest first: the lean role's one loop is a tile of 64 (or 128) tokens;
the generic role's are its boundary, tail and sink loops (one tile of the default GENERIC_TILE tokens each).
``--loads`` shows which global loads Triton pipelines (``LDGSTS``: cp.async into shared memory) and which it issues
as plain ``LDG`` outside the pipeline.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def compile_kernel(bits: int, boost: int, role: int, maxnreg: int, tile: int, merge: bool, outdir: str,
                   generic_warps: int = 4) -> tuple[str, str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvlab.kernels import decode_attention as da

    da.apply_tuning_overrides()
    fn = da._decode_kernel
    pointers = {"q_ptr": "*bf16", "sk_ptr": "*bf16", "sv_ptr": "*bf16", "kt_ptr": "*bf16", "vt_ptr": "*bf16",
                "lo_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "hi_ptr": "*u8", "idx_ptr": "*i16",
                "vc_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "mask_ptr": "*u8", "pm_ptr": "*fp32",
                "pl_ptr": "*fp32", "pacc_ptr": "*fp32", "out_ptr": "*bf16", "ticket_ptr": "*i32", "step_ptr": "*i32",
                "meta_ptr": "*i32"}
    warps = 1 if role == 1 else generic_warps
    consts = {"HKV": 8, "N_REP": 4, "QLEN": 1, "M_PAD": 8, "D": 128, "BN": tile,
              "BNG": da._tile_tokens(128, da.GENERIC_TILE), "G": 128, "KBITS": bits,
              "NB": boost, "NB_PAD": max(16, da._pow2(boost)), "HBITS": bits, "VBITS": bits, "GV": 128,
              "LEAN": True, "HAS_MASK": False, "DTYPE": tl.bfloat16, "META": False, "ROLE": role,
              "N_GENERIC": da.N_GENERIC, "MERGE_RP": 4, "MERGE_CH": da.MERGE_LOAD_REGS * 32 * warps // (4 * 128) if merge else 0}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
                 for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in pointers}
    options = {"num_warps": warps, "num_stages": 3, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=aligned),
                            target=GPUTarget("cuda", 90, 32), options=options)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptx, cubin = Path(outdir, "k.ptx"), Path(outdir, "k.cubin")
    ptx.write_text(kernel.asm["ptx"])
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([f"{bindir}/ptxas", "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                           capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([f"{bindir}/cuobjdump", "--dump-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    return usage, sass


def loops(sass: str) -> list[tuple[int, collections.Counter, list[str]]]:
    """(instruction count, opcode histogram, global memory instructions) of every loop (a backward branch) in the
    SASS, largest first."""
    code = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    index = {a: i for i, (a, _) in enumerate(code)}
    found = []
    for i, (a, text) in enumerate(code):
        m = re.search(r"BRA .*?0x([0-9a-f]+)", text)
        target = int(m.group(1), 16) if m else a
        if target < a and target in index:
            body = code[index[target]:i + 1]
            names = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body]  # e.g. LDGSTS.E.BYPASS.128
            kinds = [name.split(".")[0] for name in names]
            found.append((len(body), collections.Counter(kinds),
                          [name for name, kind in zip(names, kinds) if kind in ("LDG", "LDGSTS", "STG")]))
    return sorted(found, key=lambda x: -x[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=2, choices=[2, 4])
    p.add_argument("--boost", type=int, default=0, help="Kitty boosted channels (kitty-pro: 25)")
    p.add_argument("--role", choices=["lean", "generic"], default="lean")
    p.add_argument("--maxnreg", type=int, default=0)
    p.add_argument("--tile", type=int, default=64, choices=[64, 128], help="lean tile tokens")
    p.add_argument("--no-merge", action="store_true", help="without the merge by the last program")
    p.add_argument("--generic-warps", type=int, default=4, choices=[1, 2, 4])
    p.add_argument("--loads", action="store_true",
                   help="also count each loop's global loads and stores by kind and width")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        role = 1 if args.role == "lean" else 2
        usage, sass = compile_kernel(args.bits, args.boost, role, args.maxnreg, args.tile, not args.no_merge,
                                     tmp, args.generic_warps)
    regs = re.findall(r"Used (\d+) registers", usage)
    spills = re.findall(r"(\d+) bytes spill stores", usage)
    found = loops(sass)
    print(f"registers {regs[-1] if regs else '?'}, spill stores {spills[-1] if spills else '?'} B, "
          f"loops of {', '.join(str(n) for n, _, _ in found)} instructions")
    for n, ops, memory in found:
        print(f"{n:5d}: " + " ".join(f"{op}:{c}" for op, c in ops.most_common(20)))
        if args.loads:
            print("       " + " ".join(f"{op}:{c}" for op, c in collections.Counter(memory).most_common()))

if __name__ == "__main__":
    main()
