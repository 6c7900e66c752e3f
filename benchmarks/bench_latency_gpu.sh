#!/usr/bin/env bash
# One command on an H100: decode latency / throughput of fp16, kivi-2 and kitty-pro (fused Triton
# kernels) against transformers' own caches, on a random-weight Llama-3.1-8B (bf16), context 4096,
# batch 1 and 16, 64 decode steps (8 warm-up). Budget: < 7 minutes: ~40 s per hf-static-compiled row
# (torch.compile + CUDA graph capture), and kvlab rows compile their decoder layers in warm-up
# (the row's warmup_s). Results: $OUT/bench when OUT is set, else
# results/bench (latency.json, plots); the table is printed last.
#     bash benchmarks/bench_latency_gpu.sh
# hf-quanto-2/4 rows need optimum-quanto (pip install optimum-quanto); without it they are noted as
# skipped. With it, quanto's first 2-bit dequantize on CUDA builds its CUDA extension with nvcc
# (minutes, once per machine), which this budget does not cover.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
DIR="${OUT:+$OUT/bench}"
DIR="${DIR:-results/bench}"
KVLAB=("${PYTHON:-python3}" -c 'import sys; from kvlab.cli import main; sys.exit(main())')  # the kvlab CLI

timeout 420 "${KVLAB[@]}" bench latency --model random:llama-3.1-8b --methods fp16 kivi-2 kitty-pro \
    --batch-sizes 1 16 --context-lengths 4096 --gen-len 64 --hf-baselines --device cuda \
    --output-dir "$DIR" 2>&1 | tee "${OUT:-/tmp}/bench_latency.log"
rc=${PIPESTATUS[0]}
echo "bench rc=$rc; results in $DIR/"
exit "$rc"
