#!/usr/bin/env bash
# Developer tool (several GPUs): the tensor-parallel runs of BENCHMARKS.md for every TP
# degree the machine has (1, 2, 4, 8 up to the GPU count): the sharded-vs-one-GPU check at
# the largest degree, then decode tokens/s of the 4-bit and the bf16 70B-shaped model.
#   OUT=/tmp/out tools/tp_bench.sh            # after pip install --no-build-isolation --no-deps -e .
#   CONFIG=8b BATCHES=1,4,16 tools/tp_bench.sh
#   ATTENTION=cudnn tools/tp_bench.sh         # decode attention (llama.ATTENTION; default auto: Pallas per device)
# Each variant runs in its own process (a bf16 70B model at TP1 fills a GPU); logs and JSON
# go to $OUT, a summary of the tokens/s lines last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.97
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared hosts
CONFIG=${CONFIG:-70b}; BATCHES=${BATCHES:-1,16}; ATTENTION=${ATTENTION:-auto}
gpus=$(nvidia-smi -L | wc -l)
tps=""; for t in 1 2 4 8; do [ "$t" -le "$gpus" ] && tps="$t${tps:+,$tps}"; done  # largest first
top=${tps%%,*}
echo "$gpus GPUs; TP degrees $tps"
python3 examples/tp_inference.py --config "$CONFIG" --tp "$top" --attention "$ATTENTION" --bench --bench-variants quant \
  --bench-tp "$tps" --bench-batches "$BATCHES" --json "$OUT/tp_${CONFIG}_quant.json" >"$OUT/tp_${CONFIG}_quant.log" 2>&1
echo "quantized: rc=$?"
python3 examples/tp_inference.py --config "$CONFIG" --tp "$top" --attention "$ATTENTION" --no-check --bench --bench-variants bf16 \
  --bench-tp "$tps" --bench-batches "$BATCHES" --json "$OUT/tp_${CONFIG}_bf16.json" >"$OUT/tp_${CONFIG}_bf16.log" 2>&1
echo "bf16: rc=$?"
grep -h "sharded vs single\|collectives in\|tokens/s\|does not fit" "$OUT/tp_${CONFIG}_quant.log" "$OUT/tp_${CONFIG}_bf16.log"
