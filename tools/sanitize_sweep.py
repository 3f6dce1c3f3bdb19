"""A small sweep of qgemm calls for compute-sanitizer (developer tool, GPU).

Covers every FLUTE kernel variant: the decode kernel (bits 2/3/4, f16/bf16, 8/16/32-row
launches, both scale-flush periods, two launches for M = 40 when forced) and, on Hopper,
the tile kernel (64- and 128-row tiles, several x tiles in one launch, 128- and
256-feature columns), on shapes with partial Stream-K columns and a partial last
k-unit; each result is checked against the float64 reference, so a run under the
sanitizer also shows the instrumented kernel computed the right thing:

    compute-sanitizer --tool memcheck --kernel-name kns=Flute python tools/sanitize_sweep.py
    compute-sanitizer --tool racecheck --kernel-name kns=Flute python tools/sanitize_sweep.py

``--tile-only`` keeps the tile kernel's cases.
"""

from __future__ import annotations

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flute_jax as fj


def reference(x, qw):
    """float64 ``x @ W_hat`` (dequantize forms W_hat exactly in float32 for 16-bit tables and scales)."""
    w = np.asarray(fj.dequantize(qw, jnp.float32), np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ w


def main() -> int:
    rng = np.random.default_rng(0)
    # (M, K, N, group, GPU path): "mma" forces the decode kernel; "" is the automatic
    # choice, the tile kernel on Hopper for M > 32.
    shapes = ((1, 1000, 304, 64, ""), (16, 520, 136, 128, ""), (30, 768, 392, -1, ""), (40, 264, 200, 32, "mma"),
              (40, 1000, 304, 64, ""), (200, 520, 136, 128, ""), (300, 4096, 8200, 128, ""))
    if "--tile-only" in sys.argv[1:]:  # the tile kernel's cases (a shorter run under the sanitizer)
        shapes = tuple(sh for sh in shapes if sh[0] > 32 and not sh[4])
    cases = list(itertools.product((2, 3, 4), ("bfloat16", "float16"), shapes))
    bad = 0
    for bits, dtype, (m, k, n, group, path) in cases:
        w = rng.standard_normal((k, n)).astype(np.float32)
        qw = fj.quantize(w, bits=bits, group_size=group, dtype=dtype)
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        os.environ["FLUTE_JAX_GPU_PATH"] = path
        jax.clear_caches()  # the path is read when a call is lowered
        y = np.asarray(jax.jit(fj.qgemm)(x, qw).astype(jnp.float32), np.float64)
        ref = reference(x, qw)
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        ok = err <= (2e-3 if dtype == "float16" else 1e-2)
        bad += not ok
        print(f"bits {bits} {dtype:8s} M={m:<3d} K={k:<5d} N={n:<5d} group {group:4d} {path or 'auto':4s}: "
              f"rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    print(f"{len(cases) - bad}/{len(cases)} ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
