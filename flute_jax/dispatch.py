"""Which GPU path a ``qgemm`` call takes, chosen from its static shapes at lowering time.

Three paths, all within the format's tolerances of the float64 reference:

``mma``
    The FLUTE decode kernel (``csrc/qgemm_flute.cuh``): mma.sync tensor-core tiles
    of 8 to 32 rows, scales applied in float32. It reads the packed weight once per
    32 rows of x: memory-bound, the fastest path while M is small (decode).
``wgmma``
    The FLUTE tile kernel (``csrc/qgemm_wgmma.cuh``; Hopper, compute capability 9.0
    only): warpgroup wgmma on 32-, 64- or 128-row tiles of x, reading the weight once per
    128 rows; batched decode and the short end of prefill.
``dense``
    Dequantize the weight to x's dtype once (our CUDA kernel, ``csrc/dequant_kernel.cu``,
    at ~90% of the copy bandwidth), then XLA's dot. Costs an extra write and read of a
    16-bit weight, which long prefills amortize; also the large-M path of GPUs without
    wgmma, where the decode kernel would stream the weight ``ceil(M / 32)`` times.

The rule is thresholds on M, from H100 and H200 measurements (BENCHMARKS.md): M <=
``DECODE_MAX_M`` takes ``mma``; above it a Hopper GPU takes ``wgmma`` up to
``tile_max_m(device_kind)`` (``TILE_MAX_M``, or the GPU's entry in ``TILE_MAX_M_BY_GPU``)
and ``dense`` beyond; other GPUs take ``mma`` up to ``KERNEL_MAX_M`` and
``dense`` beyond. Device time per call, 4-bit g128 bf16, H100, 2026-11-24 (tile kernel
v7, dense path with the CUDA dequantize kernel):

    K x N          M=256 tile/dense   M=384 tile/dense   M=512 tile/dense
    4096 x 4096       36 / 35 us          47 / 40 us          58 / 41 us
    4096 x 28672     167 / 206 us        228 / 241 us        292 / 271 us
    8192 x 8192      113 / 117 us        143 / 130 us        176 / 146 us
    8192 x 57344     524 / 776 us        767 / 896 us       1020 / 1019 us

    (geomean tile/dense time: 0.86 at M = 256, 1.01 at 384, 1.17 at 512)

    Without wgmma, decode kernel / dense (v5 measurement, dense path then an XLA fusion):
    K x N          M=64                M=128               M=256
    4096 x 4096       31 / 74 us          64 / 74 us          129 / 77 us
    4096 x 28672     136 / 488 us        271 / 490 us         543 / 524 us
    8192 x 8192       83 / 282 us        166 / 282 us         337 / 285 us
    8192 x 57344     489 / 1950 us       974 / 1961 us       1935 / 2041 us

On an H200 (4.8 TB/s against the H100's 3.35, the same tensor cores), with the tile
kernel of 2026-11-30 (session 14: x and codes by TMA, a 32-row tile for M <= 32), speed-up
over XLA's bf16 dot, geomean over the 8 Llama-3 8B/70B TP1 shapes, 4-bit g128 bf16, each
row from one run (``docs/bench/h200-2026-11-30-s14-*.json``):

    M                               16      24      32      256     384     512
    decode kernel                  1.59x   1.11x   1.00x
    tile kernel                    1.37x   1.39x   1.38x   0.66x   0.68x   0.68x
    dense path                                             0.53x   0.62x   0.67x

    (at M = 512 the tile kernel is faster on 5 of 8 shapes, by 1-27%, and the dense
    path on three 8B shapes, by 9-29%: they tie there)

Session 16 (H200, ``python -m flute_jax.tune``, device us per call, M = 512):

    K x N          tile / dense        K x N          tile / dense
    4096 x 6144     68.4 / 57.3 us     8192 x 10240   159.3 / 164.6 us
    4096 x 4096     38.8 / 35.8 us     8192 x 8192    132.5 / 129.1 us
    4096 x 28672   211.6 / 233.8 us    8192 x 57344   715.0 / 910.9 us
    14336 x 4096   124.6 / 114.2 us    28672 x 8192   370.0 / 441.1 us

So the H200's limit of 512 applies to weights of 8192 x 8192 elements and more
(``TILE_MIN_WEIGHT_FOR_GPU_MAX``); smaller ones go dense above ``TILE_MAX_M``. A bench
run with the tuner's cache, which makes the same choices at M = 512, measured 0.71x of
XLA's bf16 dot in geomean against 0.67x for the rule before (``docs/bench/h200-2026-11-30-s16-tune-*``).

A tuning cache (:mod:`flute_jax.tuning`, written by ``python -m flute_jax.tune`` on the
user's GPU) refines the rule per problem: where it holds a measurement for the call's GPU
kind, bits, group size, dtype, K and N at a nearby M, the measured fastest path wins.

The environment variable ``FLUTE_JAX_GPU_PATH`` (``mma``, ``wgmma`` or ``dense``)
overrides both, for measuring the paths against each other; users never need it.
``force_path`` does the same inside a ``with`` block (the tuner uses it). A forced
``wgmma`` on a GPU without it runs ``mma``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional

import jax

from . import tuning

# Largest M that the decode kernel takes when the tile kernel can run instead. From 17
# rows the decode kernel runs its 32-row instance, which the tile kernel beats (H200,
# 4-bit g128 bf16, geomean over the 8 Llama-3 8B/70B shapes: at M = 16 decode 1.59x,
# tile 1.37x; at M = 24 decode 1.11x, tile 1.39x; the H100 gave the same order).
DECODE_MAX_M = 16
# Largest M that the tile kernel takes: beyond it one dequantization plus XLA's dot
# (near the tensor-core peak) beats the tile kernel's multiply rate (they tied at 384 on
# an H100 with the tile kernel of 2026-11-24). TILE_MAX_M_BY_GPU overrides it for GPUs
# whose device kind contains the key: on an H200 the two tie at 512 (above).
TILE_MAX_M = 384
TILE_MAX_M_BY_GPU = {"H200": 512}
# ...but only for weights of at least this many elements (K x N); smaller weights keep
# TILE_MAX_M. At M = 512 on an H200 the dense path beat the tile kernel on all three
# smaller 8B shapes (4096 x 4096, 4096 x 6144, 14336 x 4096: by 9-29% in session 14,
# 8-19% in session 16), tied on 8192 x 8192, and lost on the five larger ones.
TILE_MIN_WEIGHT_FOR_GPU_MAX = 8192 * 8192
# Largest M that the decode kernel takes on GPUs without wgmma. Above it the kernel's
# re-reads of the weight (one pass per 32 rows) cost more than one dequantization
# plus a tensor-core dot.
KERNEL_MAX_M = 192

PATHS = tuning.PATHS  # ("mma", "wgmma", "dense")


def tile_max_m(device_kind: str = "", weight_elements: Optional[int] = None) -> int:
    """The largest M that the tile kernel takes on a GPU of this JAX ``device_kind``, for
    a weight of ``weight_elements`` (K x N; None: a large one)."""
    if weight_elements is not None and weight_elements < TILE_MIN_WEIGHT_FOR_GPU_MAX:
        return TILE_MAX_M
    for key, m in TILE_MAX_M_BY_GPU.items():
        if key in device_kind:
            return m
    return TILE_MAX_M


@functools.lru_cache(maxsize=None)
def gpu_device_kind() -> str:
    """The first local GPU's ``device_kind`` (e.g. "NVIDIA H200"), or "" without one.

    Like ``cuda_has_wgmma``, this assumes the process's GPUs are alike.
    """
    try:
        return jax.local_devices(backend="gpu")[0].device_kind
    except RuntimeError:  # no GPU backend (CPU-only machines still lower for CUDA)
        return ""


_forced = threading.local()


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Within the block, every ``qgemm`` traced and lowered for a GPU takes ``path``.

    Paths are chosen when a jitted function is lowered: a function compiled before the
    block keeps its path. Applies to the calling thread only.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    previous = getattr(_forced, "path", None)
    _forced.path = path
    try:
        yield
    finally:
        _forced.path = previous


def gpu_path(
    m: int,
    k: int,
    n: int,
    bits: int,
    *,
    wgmma: bool,
    device_kind: str = "",
    group_size: Optional[int] = None,
    dtype: Optional[str] = None,
) -> str:
    """``"mma"``, ``"wgmma"`` or ``"dense"`` for an ``[m, k] x [k, n]`` qgemm at ``bits``.

    ``wgmma``: whether the GPU runs the tile kernel (``flute_jax._ffi.cuda_has_wgmma()``).
    ``device_kind``: the GPU's JAX device kind (``gpu_device_kind()``), for the
    GPU-specific thresholds; "" takes the defaults. ``group_size`` (K rows per scale
    group, resolved) and ``dtype`` (x's dtype name): with both and a device kind, a
    tuning-cache entry for the problem decides (:mod:`flute_jax.tuning`).
    Precedence: ``force_path``, then ``FLUTE_JAX_GPU_PATH``, then the cache, then the rule.
    """
    forced = getattr(_forced, "path", None) or os.environ.get("FLUTE_JAX_GPU_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"FLUTE_JAX_GPU_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    if group_size is not None and dtype is not None:
        tuned = tuning.lookup(device_kind, bits, group_size, dtype, k, n, m)
        if tuned is not None and (tuned != "wgmma" or wgmma):
            return tuned
    return rule_path(m, k, n, bits, wgmma=wgmma, device_kind=device_kind)


def rule_path(m: int, k: int, n: int, bits: int, *, wgmma: bool, device_kind: str = "") -> str:
    """The rule alone: thresholds on M (the module docstring has the measurements)."""
    if m <= DECODE_MAX_M:
        return "mma"
    if wgmma:
        return "wgmma" if m <= tile_max_m(device_kind, k * n) else "dense"
    return "mma" if m <= KERNEL_MAX_M else "dense"
