#!/usr/bin/env bash
# GPU check script for the device machine: build in place, run the GPU tests,
# optionally a benchmark command; logs under $OUT, a short summary last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_tile.py tests/test_gpu_epilogue.py tests/test_gpu_dequant.py tests/test_gpu_graph.py tests/test_gpu_counters.py tests/test_gpu_llama.py tests/test_gpu_examples.py tests/test_dispatch.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
rc=${PIPESTATUS[0]}
echo "tests rc=$rc ($(( $(date +%s) - t0 ))s)"
if [ -n "${BENCH_CMD:-}" ]; then
  eval "$BENCH_CMD" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $rc
