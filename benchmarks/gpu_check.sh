#!/usr/bin/env bash
# One command on a GPU machine: the kernel tests compiled (no TRITON_INTERPRET), then the
# end-to-end check and the decode-attention benchmark. Logs and JSON go to $OUT when set.
# Budget: < 9 minutes (timeouts 150 + 200 + 160 s); the summary table is printed last.
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
LOG="${OUT:-/tmp}"
mkdir -p "$LOG"
PY="${PYTHON:-python}"

$PY - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

echo "== kernel tests (compiled) =="
if $PY -c "import pytest" 2>/dev/null; then
    timeout 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/test_kernels.py 2>&1 | tee "$LOG/test_kernels.log"
    tests_rc=$?
else
    echo "pytest not installed: running the test functions directly"
    timeout 150 $PY - <<'PY' 2>&1 | tee "$LOG/test_kernels.log"
import itertools, sys, traceback
sys.path.insert(0, "tests")
import test_kernels as t
failed = 0
for name in dir(t):
    fn = getattr(t, name)
    if not name.startswith("test_") or name == "test_kernels_interpreted":
        continue
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    cases = [dict(zip([a.strip() for a in m.args[0].split(",")], v if isinstance(v, tuple) else (v,)))
             for m in marks for v in m.args[1]] or [{}]
    for kw in cases:
        try:
            fn(**kw); print("PASS", name, kw)
        except Exception:
            failed += 1; print("FAIL", name, kw); traceback.print_exc(limit=3)
sys.exit(1 if failed else 0)
PY
    tests_rc=$?
fi

echo "== end-to-end fused vs reference =="
timeout 200 $PY benchmarks/gpu_e2e.py 2>&1 | tee "$LOG/e2e.log"
e2e_rc=$?

echo "== decode attention benchmark =="
timeout 160 $PY benchmarks/attention.py 2>&1 | tee "$LOG/attention.log"
bench_rc=$?

echo
echo "== summary =="
echo "tests rc=$tests_rc e2e rc=$e2e_rc benchmark rc=$bench_rc"
grep -E "passed|failed|error" "$LOG/test_kernels.log" | tail -3
grep -E "OK|FAIL|generate" "$LOG/e2e.log"
grep -E "^check " "$LOG/attention.log"
sed -n '/^us = device time/,$p' "$LOG/attention.log"
exit $(( tests_rc || e2e_rc || bench_rc ))
