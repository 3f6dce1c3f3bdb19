#!/usr/bin/env bash
# Developer tool (GPU): per-kernel times, then Nsight Compute reports of chosen shapes.
#   OUT=/tmp/out tools/ncu_probe.sh "4096x4096:1:4 8192x57344:1:4"
# Each KxN:M:bits gets a full ncu report ($OUT/ncu_<tag>.ncu-rep) plus raw CSV and
# the SASS source view with stall samples, for reading off the device.
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
  ncu -i "$OUT/ncu_$tag.ncu-rep" --page details >"$OUT/ncu_${tag}_details.txt" 2>&1
  ncu -i "$OUT/ncu_$tag.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu_${tag}_sass.csv" 2>&1
  echo "== $tag"; grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Issued Ipc Active|Executed Ipc Active|No Eligible|Warp Cycles Per Issued)" "$OUT/ncu_${tag}_details.txt"
done
