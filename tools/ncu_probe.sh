#!/usr/bin/env bash
# Developer tool (GPU): per-kernel times, then Nsight Compute reports of chosen shapes.
#   OUT=/tmp/out tools/ncu_probe.sh "4096x4096:1:4 8192x57344:1:4"
# Each KxN:M:bits gets a full ncu report ($OUT/ncu_<tag>.ncu-rep) plus raw CSV and
# the SASS source view with stall samples, for reading off the device (the report
# and raw CSV are deleted unless KEEP_REP is set: the device returns few files).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for spec in ${1:-4096x4096:1:4}; do
  IFS=: read -r shape m bits <<<"$spec"
  tag="${shape}_m${m}_b${bits}"
  ncu --set full --import-source no --clock-control none --kernel-name regex:Flute \
      --launch-skip 12 --launch-count 1 -f -o "$OUT/ncu_$tag" \
      python3 tools/kernel_probe.py --shapes "$shape" --m "$m" --bits "$bits" --calls 16 --no-trace \
      >"$OUT/ncu_$tag.log" 2>&1 || { echo "ncu failed for $tag"; tail -5 "$OUT/ncu_$tag.log"; continue; }
  ncu -i "$OUT/ncu_$tag.ncu-rep" --page raw --csv >"$OUT/ncu_${tag}_raw.csv" 2>&1
  python3 - "$OUT/ncu_${tag}_raw.csv" <<'PY' >"$OUT/ncu_${tag}_key.txt"
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
for h, v in zip(rows[0], rows[2]):
    if h.split(".")[0] in ("sm__cycles_active", "sm__cycles_elapsed", "smsp__inst_executed", "dram__bytes_read", "gpu__time_duration", "l1tex__data_pipe_lsu_wavefronts_mem_shared", "sm__inst_executed_pipe_lsu", "smsp__inst_executed_op_shared_ld") or "pipe_" in h and "pct" in h:
        print(h, v)
PY
  ncu -i "$OUT/ncu_$tag.ncu-rep" --page details >"$OUT/ncu_${tag}_details.txt" 2>&1
  ncu -i "$OUT/ncu_$tag.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu_${tag}_sass.csv" 2>&1
  [ -n "${KEEP_REP:-}" ] || rm -f "$OUT/ncu_$tag.ncu-rep" "$OUT/ncu_${tag}_raw.csv" "$OUT/ncu_$tag.log"
  echo "== $tag"; grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Issued Ipc Active|Executed Ipc Active|No Eligible|Warp Cycles Per Issued)" "$OUT/ncu_${tag}_details.txt"
done
