#!/usr/bin/env bash
# Developer tool (no GPU needed): build a git ref's extension here, for the device.
#
#   tools/prebuild.sh REF [NAME]    # -> .snap/ab/NAME (NAME defaults to REF with '/' -> '-')
#
# The device machine's time is short and its builds take minutes, so A/B trees are built
# here: the ref's files (without docs/) go to .snap/ab/NAME, a wheel is built for sm_90a
# only, and its compiled module is unpacked into the tree. The tree then runs on the device
# without installing anything: PYTHONPATH=$PWD/.snap/ab/NAME (as tools/ab_builds.sh does
# with PREBUILT=1), and travels in the device tool's `carry` (about 17 MB a tree).
#
# The extension must match the device's Python (3.12) and JAX (0.11.2) headers:
# PYTHON (default python3.12; with pyenv, PYENV_VERSION=3.12.1) needs jax==0.11.2,
# nanobind and scikit-build-core installed. .snap/ should be in .git/info/exclude.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: tools/prebuild.sh REF [NAME]" >&2; exit 2; }
ref=$1; name=${2:-${ref//\//-}}
top=$(git rev-parse --show-toplevel); cd "$top"
PYTHON=${PYTHON:-python3.12}
"$PYTHON" -c "import jax, nanobind, scikit_build_core" 2>/dev/null || {
  echo "$PYTHON lacks jax / nanobind / scikit-build-core (see the header of this script)" >&2; exit 1; }
tree=.snap/ab/$name; wheels=$(mktemp -d)
rm -rf "$tree"; mkdir -p "$tree"
git archive "$ref" | tar -x -C "$tree"
rm -rf "$tree/docs"
(cd "$tree" && SKBUILD_CMAKE_DEFINE=CMAKE_CUDA_ARCHITECTURES=90a-real \
   "$PYTHON" -m pip wheel . --no-deps --no-build-isolation -q -w "$wheels")
unzip -o -q "$wheels"/*.whl 'flute_jax/_flute_ffi*' -d "$tree"
rm -rf "$tree/build" "$wheels"
ls "$tree"/flute_jax/_flute_ffi* >/dev/null
echo "$tree: $(git rev-parse --short "$ref"), $(du -sh "$tree" | cut -f1)"
