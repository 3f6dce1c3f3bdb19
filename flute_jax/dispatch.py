"""Which GPU path a ``qgemm`` call takes, chosen from its static shapes at lowering time.

Three paths, all within the format's tolerances of the float64 reference:

``mma``
    The FLUTE decode kernel (``csrc/qgemm_flute.cuh``): mma.sync tensor-core tiles
    of 8 to 32 rows, scales applied in float32. It reads the packed weight once per
    32 rows of x: memory-bound, the fastest path while M is small (decode).
``wgmma``
    The FLUTE tile kernel (``csrc/qgemm_wgmma.cuh``; Hopper, compute capability 9.0
    only): warpgroup wgmma on 64- or 128-row tiles, reading the weight once per 128
    rows; batched decode and prefill.
``dense``
    Dequantize the weight to x's dtype once (one XLA fusion), then XLA's dot with
    float32 accumulation. Costs an extra write and read of a 16-bit weight; the
    large-M path of GPUs without wgmma, where the decode kernel would stream the
    weight ``ceil(M / 32)`` times.

The rule is two thresholds on M, from H100 measurements (BENCHMARKS.md):
M <= ``DECODE_MAX_M`` takes ``mma``; above it a Hopper GPU takes ``wgmma``; other
GPUs take ``mma`` up to ``KERNEL_MAX_M`` and ``dense`` above. Without wgmma the
crossing of the decode kernel and the dense path lies between M = 150 and 256
(device time per call, 4-bit g128 bf16, H100, 2026-11-23):

    K x N          M=64 kernel/dense   M=128 kernel/dense   M=256 kernel/dense
    4096 x 4096       31 / 74 us          64 / 74 us           129 / 77 us
    4096 x 28672     136 / 488 us        271 / 490 us          543 / 524 us
    8192 x 8192       83 / 282 us        166 / 282 us          337 / 285 us
    8192 x 57344     489 / 1950 us       974 / 1961 us        1935 / 2041 us

The environment variable ``FLUTE_JAX_GPU_PATH`` (``mma``, ``wgmma`` or ``dense``)
overrides the rule, for measuring the paths against each other; users never need it.
A forced ``wgmma`` on a GPU without it runs ``mma``.
"""

from __future__ import annotations

import os

# Largest M that the decode kernel takes when the tile kernel can run instead.
DECODE_MAX_M = 32
# Largest M that the decode kernel takes on GPUs without wgmma. Above it the kernel's
# re-reads of the weight (one pass per 32 rows) cost more than one dequantization
# plus a tensor-core dot.
KERNEL_MAX_M = 192

PATHS = ("mma", "wgmma", "dense")


def gpu_path(m: int, k: int, n: int, bits: int, *, wgmma: bool) -> str:
    """``"mma"``, ``"wgmma"`` or ``"dense"`` for an ``[m, k] x [k, n]`` qgemm at ``bits``.

    ``wgmma``: whether the GPU runs the tile kernel (``flute_jax._ffi.cuda_has_wgmma()``).
    """
    forced = os.environ.get("FLUTE_JAX_GPU_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"FLUTE_JAX_GPU_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    if m <= DECODE_MAX_M:
        return "mma"
    if wgmma:
        return "wgmma"
    return "mma" if m <= KERNEL_MAX_M else "dense"
