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

The choice is one threshold on M, from H100 measurements (BENCHMARKS.md, "Kernel or
dense"): the kernel's time grows with ceil(M / 32) while the dense path's is nearly flat
in M up to a few hundred rows. Device time per call, 4-bit g128 bf16, 2026-11-23:

    K x N          M=64 kernel/dense   M=128 kernel/dense   M=256 kernel/dense
    4096 x 4096       31 / 74 us          64 / 74 us           129 / 77 us
    4096 x 28672     136 / 488 us        271 / 490 us          543 / 524 us
    8192 x 8192       83 / 282 us        166 / 282 us          337 / 285 us
    8192 x 57344     489 / 1950 us       974 / 1961 us        1935 / 2041 us

The crossings lie between M = 150 and 256; 192 splits them.
The environment variable ``FLUTE_JAX_GPU_PATH`` (``kernel`` or ``dense``) overrides it,
for measuring both paths; users never need it.
"""

from __future__ import annotations

import os

# Largest M that the FLUTE kernel takes. Above it the kernel's re-reads of the weight
# (one pass per 32 rows) cost more than one dequantization plus a tensor-core dot.
KERNEL_MAX_M = 192

PATHS = ("kernel", "dense")


def gpu_path(m: int, k: int, n: int, bits: int) -> str:
    """``"kernel"`` or ``"dense"`` for an ``[m, k] x [k, n]`` qgemm at ``bits`` on a GPU."""
    forced = os.environ.get("FLUTE_JAX_GPU_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"FLUTE_JAX_GPU_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    return "kernel" if m <= KERNEL_MAX_M else "dense"
