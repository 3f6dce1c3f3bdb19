"""Which GPU path a ``qgemm`` call takes, chosen from its static shapes at lowering time.

Two paths, both within the format's tolerances of the float64 reference:

``kernel``
    The FLUTE kernel (``csrc/qgemm_flute.cuh``): reads the packed weight once per 32
    rows of x. It is memory-bound and wins while M is small (decode, batched decode).
``dense``
    Dequantize the weight to x's dtype once (one XLA fusion: unpack, table gather,
    scale), then XLA's dot with float32 accumulation. Costs an extra write and read of a
    16-bit weight, but runs the dot at XLA's tensor-core rate: it wins in prefill, where
    the kernel would stream the weight ``ceil(M / 32)`` times.

The choice is one threshold on M, from H100 measurements (BENCHMARKS.md, "M curve").
The environment variable ``FLUTE_JAX_GPU_PATH`` (``kernel`` or ``dense``) overrides it,
for measuring both paths; users never need it.
"""

from __future__ import annotations

import os

# Largest M that the FLUTE kernel takes. Above it the kernel's re-reads of the weight
# (one pass per 32 rows) cost more than one dequantization plus a tensor-core dot.
KERNEL_MAX_M = 128

PATHS = ("kernel", "dense")


def gpu_path(m: int, k: int, n: int, bits: int) -> str:
    """``"kernel"`` or ``"dense"`` for an ``[m, k] x [k, n]`` qgemm at ``bits`` on a GPU."""
    forced = os.environ.get("FLUTE_JAX_GPU_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"FLUTE_JAX_GPU_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    return "kernel" if m <= KERNEL_MAX_M else "dense"
