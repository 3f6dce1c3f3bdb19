#!/usr/bin/env bash
# Developer tool (GPU): an A/B of several builds in one device session.
#
#   # here: one source tree per git ref, under an ignored folder that travels with `carry`
#   for ref in main wip/x-tma; do d=.snap/ab/${ref//\//-}; mkdir -p $d; git archive $ref | tar -x -C $d; done
#   # on the device:
#   OUT=/tmp/out tools/ab_builds.sh .snap/ab/main .snap/ab/wip-x-tma
#
# Each tree is installed in turn (pip install -e, no build isolation) and benchmarked with
# the same command (BENCH_ARGS, default: the 8 Llama-3 8B/70B shapes, M = 1 and 16, 4-bit);
# then `python -m flute_jax.bench compare` puts the runs side by side, the first as the
# baseline. With TEST set, each build also runs `pytest -x -q $TEST` before its benchmark
# (a build that fails its tests is not benchmarked). The last tree stays installed.
# With PREBUILT=1 the trees come from tools/prebuild.sh, built off the device: nothing is
# installed, and each tree runs through PYTHONPATH instead.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: runs happen in other folders
BENCH_ARGS=${BENCH_ARGS:---shapes llama3-8b,llama3-70b --methods flute,xla_dot --calls 20 --m 1,16 --bits 4}
[ $# -ge 1 ] || { echo "usage: tools/ab_builds.sh TREE [TREE ...]" >&2; exit 2; }
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s]"; }
jsons=(); labels=()
i=0
for tree in "$@"; do
  i=$((i + 1)); name=$(basename "$tree")
  [[ " ${labels[*]:-} " == *" $name "* ]] && name="$name-$i"  # the same tree twice: an A/A of the noise
  tree=$(cd "$tree" && pwd) || { echo "no tree $tree" >&2; continue; }
  if [ -n "${PREBUILT:-}" ]; then
    ls "$tree"/flute_jax/_flute_ffi* >/dev/null 2>&1 || { echo "$(el) $name: no prebuilt module"; continue; }
    export PYTHONPATH=$tree
  elif ! (cd "$tree" && python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build_$name.log" 2>&1); then
    echo "$(el) $name: build failed"; tail -20 "$OUT/build_$name.log"; continue
  else
    echo "$(el) $name: built"
  fi
  if [ -n "${TEST:-}" ]; then
    # run from the tree, so its tests exercise its own build
    (cd "$tree" && python3 -m pytest -x -q -p no:cacheprovider $TEST >"$OUT/test_$name.log" 2>&1)
    rc=$?; echo "$(el) $name: tests rc=$rc: $(tail -1 "$OUT/test_$name.log")"
    [ $rc -eq 0 ] || continue
  fi
  # from outside every tree, so `import flute_jax` is the installed (editable) or PYTHONPATH build
  (cd /tmp && python3 -m flute_jax.bench --no-progress $BENCH_ARGS --json "$OUT/ab_$name.json" >"$OUT/bench_$name.log" 2>&1)
  echo "$(el) $name: bench rc=$?"
  [ -s "$OUT/ab_$name.json" ] && { jsons+=("$OUT/ab_$name.json"); labels+=("$name"); }
done
[ ${#jsons[@]} -ge 1 ] || exit 1
# (from /tmp too: in the repository root `-m` would import the source tree, which has no extension)
(cd /tmp && IFS=, && python3 -m flute_jax.bench compare "${jsons[@]}" --labels "${labels[*]}") | tee "$OUT/ab_compare.txt"
