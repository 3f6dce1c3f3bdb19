#!/usr/bin/env bash
# Developer tool (GPU, sm_90a): compute-sanitizer over the FLUTE kernels, outside JAX.
#
#   tools/sanitize.sh [OUT_DIR]
#   FLUTE_SANITIZE_BIN=prebuilt/timeline tools/sanitize.sh [OUT_DIR]   # skip the build
#
# Under JAX, compute-sanitizer died here with a segmentation fault before its first
# report (H200, JAX 0.11.2, 2026-11-30). tools/timeline.cu is a plain CUDA program on
# the production launch path (MakeFlutePlan + LaunchQgemmFlute with a call site's own
# Stream-K counters), so the tools run on it. Set FLUTE_JAX_COUNTERS=workspace to check
# the other path: the counter-zeroing kernel, then the FLUTE kernel as its dependent.
# The sweep covers bits 2/3/4, 8/16/32-row decode launches, K past the last full
# 256-k unit, N past the last 128-feature column, group sizes 32/64/128/one group, the
# tile kernel with one and two row tiles, (racecheck) blocks that reuse their pipeline
# stages many times, two N-blocks per warp (by rule and forced), and the swiglu epilogue. Numerical results
# are the GPU tests' job, not this one's.
# Prints one line per check and exits non-zero if any check reports an error.
set -uo pipefail
OUT=${1:-/tmp/flute_sanitize}; mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$SAN" ] || { echo "compute-sanitizer not found (looked on PATH and in /usr/local/cuda/bin)" >&2; exit 1; }
BIN="$OUT/timeline"
INC=$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())")
if [ -n "${FLUTE_SANITIZE_BIN:-}" ]; then
  # A binary built beforehand from the same sources (the wgmma file alone takes ~2 min to
  # compile, device time better spent on the checks).
  cp "$FLUTE_SANITIZE_BIN" "$BIN" || exit 1
else
  nvcc -std=c++17 -O3 -arch=sm_90a -DFLUTE_JAX_TIMELINE -diag-suppress 940,2473,177 -I"$INC" -I"$ROOT/csrc" \
    "$ROOT/tools/timeline.cu" "$ROOT/csrc/qgemm_wgmma.cu" -o "$BIN" > "$OUT/build.log" 2>&1 ||
    { tail -20 "$OUT/build.log"; exit 1; }
fi

failed=0
check() {  # tool, then the timeline arguments: M K N bits group reps [tile]
  local tool=$1; shift
  (cd "$OUT" && timeout 300 "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 10 "$BIN" "$@") > "$OUT/last.log" 2>&1
  local rc=$?
  cat "$OUT/last.log" >> "$OUT/sanitizer.log"
  printf '%-10s %-34s rc=%d  %s\n' "$tool" "${FLUTE_JAX_DECODE_NB:+NB=$FLUTE_JAX_DECODE_NB }${FLUTE_TIMELINE_EPILOGUE:+$FLUTE_TIMELINE_EPILOGUE }$*" "$rc" "$(grep -E 'SUMMARY' "$OUT/last.log" | tail -1 | sed 's/=* *//')"
  [ $rc -eq 0 ] || failed=1
}
: > "$OUT/sanitizer.log"
for c in "1 4096 4096 4 128" "8 4096 4104 4 128" "16 4160 4096 4 64" "32 4096 4096 4 128" \
         "1 4096 4096 3 128" "16 4096 6144 3 64" "1 4096 4096 2 4096" "8 2048 1000 2 32" "16 16384 128 3 128"; do
  check memcheck $c 1
done
check memcheck 24 4096 4096 4 128 1 tile
check memcheck 64 4096 4096 4 128 1 tile
check memcheck 200 4160 4104 3 64 1 tile
for c in "1 4096 57344 4 128 1" "16 4096 28672 4 128 1" "16 4160 4096 4 64 1" "16 8192 264 3 64 1" "64 4096 4096 4 128 1 tile" \
         "64 768 4096 4 128 1 tile" "32 4096 17000 4 128 1 tile"; do
  check racecheck $c
done
check synccheck 16 4096 4096 4 128 1
# Two N-blocks per warp: picked by the rule (70B gate/up, 8-row launch), then forced on ragged
# shapes (the second N-block of the last warp past N, K past the last full unit).
check memcheck 1 8192 57344 2 128 1
check racecheck 8 8192 57344 3 64 1
FLUTE_JAX_DECODE_NB=2 check memcheck 3 4160 1040 4 64 1
FLUTE_JAX_DECODE_NB=2 check memcheck 7 1000 296 2 128 1
FLUTE_JAX_DECODE_NB=2 check racecheck 8 2112 72 3 32 1
check initcheck 1 4096 4096 4 128 1
# The fused SwiGLU epilogue (y allocated with exactly N / 2 columns): decode launches of 1, 8 and
# 16 rows with split columns and a partial last column, two N-blocks, and the tile kernel.
FLUTE_TIMELINE_EPILOGUE=swiglu check memcheck 1 4096 4096 4 128 1
FLUTE_TIMELINE_EPILOGUE=swiglu check memcheck 16 4160 1040 3 64 1
FLUTE_TIMELINE_EPILOGUE=swiglu FLUTE_JAX_DECODE_NB=2 check memcheck 8 2112 1040 4 64 1
FLUTE_TIMELINE_EPILOGUE=swiglu check memcheck 200 4160 4112 4 64 1 tile
FLUTE_TIMELINE_EPILOGUE=swiglu check racecheck 64 4096 4096 4 128 1 tile
exit $failed
