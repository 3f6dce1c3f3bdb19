"""The wgmma tile kernel (csrc/qgemm_wgmma.cuh) on a Hopper GPU against the float64
reference (skipped without one): the path of M > dispatch.DECODE_MAX_M on H100/H200.

    pytest -q tests/test_gpu_tile.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import gpu_available
from flute_jax import _ffi, dispatch
from qgemm_checks import check_qgemm, random_weight


def _has_wgmma() -> bool:
    return gpu_available() and _ffi.cuda_has_wgmma()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_wgmma(), reason="needs a GPU with wgmma (sm_90)")]

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256, -1)
DTYPES = ("float16", "bfloat16")
# (K, N): partial 256-k units, partial 128-feature columns, N not a multiple of 16.
SHAPES = ((1000, 300), (72, 8), (513, 24), (4096, 128), (2304, 1040), (8192, 136))
# Up to 32 rows: the 32-row tile; 33..64: the 64-row tile; above: 128-row tiles, the last one partial.
MS = (20, 32, 33, 64, 65, 100, 128, 129, 200, 300)


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


@pytest.fixture(scope="module", autouse=True)
def _fresh_lowerings():
    # The path is chosen at lowering time: drop lowerings cached by other modules under
    # the automatic path, and leave none of ours behind.
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _tile_path(monkeypatch):
    # These tests are about the tile kernel: it runs at every M here, also where the
    # plan gives M to the dense path (above dispatch.tile_max_m).
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "wgmma")


def test_plan_takes_the_tile_kernel(monkeypatch):
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH")
    kind = dispatch.gpu_device_kind()
    for m in (17, 33, 64, 128, 4096):
        expected = "wgmma" if m <= dispatch.tile_max_m(kind) else "dense"
        assert dispatch.gpu_path(m, 4096, 4096, 4, wgmma=True, device_kind=kind) == expected
    # (m, k, n) -> x tile rows, column width (csrc/qgemm_plan.h; 132 multiprocessors).
    # 64-row tiles above M = 64 where 128-row ones give under 6 Stream-K iterations per
    # SM; 256-wide columns from 48 iterations per block.
    expected_tiles = {(17, 4096, 4096): (32, 128), (33, 4096, 4096): (64, 128), (64, 4096, 4096): (64, 128),
                      (128, 4096, 4096): (64, 128), (256, 4096, 4096): (128, 128), (128, 8192, 8192): (128, 128),
                      (384, 4096, 6144): (128, 128), (256, 8192, 57344): (128, 256), (128, 28672, 8192): (128, 128),
                      (4096, 4096, 4096): (128, 256)}
    if getattr(jax.devices("gpu")[0], "core_count", None) != 132:
        expected_tiles = {}  # another GPU (H100 and H200 SXM have 132): the thresholds count multiprocessors
    for (m, k, n), (tile_rows, column_n) in expected_tiles.items():
        plan = _ffi.cuda_plan(m, k, n, 128, 4, jnp.bfloat16, wgmma=True)
        assert plan["kernel"] == "flute_wgmma" and plan["workspace_bytes"] > 0
        got = (plan["rows_per_launch"], plan["column_n"])
        assert got == (tile_rows, column_n), (m, k, n, got)
        assert plan["row_tiles"] == -(-m // tile_rows)


@pytest.mark.parametrize("bits,group_size,dtype", list(itertools.product(BITS, GROUP_SIZES, DTYPES)))
def test_tile_kernel_matches_reference(rng, gpu, bits, group_size, dtype):
    i = BITS.index(bits) * 11 + GROUP_SIZES.index(group_size) * 3 + DTYPES.index(dtype)
    for j in range(2):
        k, n = SHAPES[(i + j) % len(SHAPES)]
        m = MS[(i + 3 * j) % len(MS)]
        check_qgemm(rng, gpu, k, n, (m,), bits, group_size, dtype, repeats=3)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_every_shape_and_m(rng, gpu, k, n, m):
    check_qgemm(rng, gpu, k, n, (m,), 4, 128, "bfloat16", table_kind="nf", repeats=2)


@pytest.mark.parametrize("m", [1, 3, 17, 32])
def test_forced_tile_kernel_at_small_m(rng, gpu, monkeypatch, m):
    # A tile mostly past M: the rows past M are never stored. (N a multiple of 8: the
    # FLUTE kernels take the call; N = 300 would go to the simple kernel.)
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "wgmma")
    jax.clear_caches()
    plan = _ffi.cuda_plan(m, 1000, 296, 64, 3, jnp.float16, wgmma=True)
    assert plan["kernel"] == "flute_wgmma" and plan["rows_per_launch"] == 32
    check_qgemm(rng, gpu, 1000, 296, (m,), 3, 64, "float16", repeats=2)


@pytest.mark.parametrize("bits,dtype,m", [(4, "float16", 24), (4, "bfloat16", 64), (3, "float16", 200),
                                          (2, "bfloat16", 130)])
def test_wide_columns(rng, gpu, monkeypatch, bits, dtype, m):
    # Enough Stream-K iterations per block for 256-feature columns (two N-blocks per
    # warp); N = 17000 ends in a partial column and a partial N-block.
    # (The plan takes them only from 48 iterations per block, too big a problem for a
    # float64 reference: forced here; test_plan_takes_the_tile_kernel checks the choice.)
    k, n = 4096, 17000
    rows = 32 if m <= 32 else 64 if m <= 64 else 128
    monkeypatch.setenv("FLUTE_JAX_TILE", f"{rows}x256")
    jax.clear_caches()
    plan = _ffi.cuda_plan(m, k, n, 128, bits, jnp.dtype(dtype), wgmma=True)
    assert plan["kernel"] == "flute_wgmma" and plan["column_n"] == 256
    check_qgemm(rng, gpu, k, n, (m,), bits, 128, dtype, repeats=2)


@pytest.mark.parametrize("tile,bits,dtype,m", [("32x128", 4, "bfloat16", 100), ("32x256", 3, "float16", 70),
                                               ("64x256", 2, "bfloat16", 200), ("128x128", 4, "float16", 40),
                                               ("128x256", 4, "bfloat16", 300), ("64x128", 3, "bfloat16", 129)])
def test_forced_tile_configuration(rng, gpu, monkeypatch, tile, bits, dtype, m):
    # FLUTE_JAX_TILE forces the x tile and the column width (a measuring knob, csrc/qgemm_flute.cu):
    # every instance is right at every M, also the ones the plan would not pick there.
    rows, column_n = (int(v) for v in tile.split("x"))
    monkeypatch.setenv("FLUTE_JAX_TILE", tile)
    jax.clear_caches()
    k, n = 2304, 1040
    plan = _ffi.cuda_plan(m, k, n, 64, bits, jnp.dtype(dtype), wgmma=True)
    assert plan["kernel"] == "flute_wgmma" and plan["rows_per_launch"] == rows and plan["column_n"] == column_n
    assert plan["row_tiles"] == -(-m // rows)
    check_qgemm(rng, gpu, k, n, (m,), bits, 64, dtype, repeats=2)
    # a value that is not a configuration leaves the plan's own choice
    monkeypatch.setenv("FLUTE_JAX_TILE", "96x128")
    own = _ffi.cuda_plan(m, k, n, 64, bits, jnp.dtype(dtype), wgmma=True)
    monkeypatch.delenv("FLUTE_JAX_TILE")
    assert own == _ffi.cuda_plan(m, k, n, 64, bits, jnp.dtype(dtype), wgmma=True)


def test_tile_kernel_nan_propagates(rng, gpu):
    qw = jax.device_put(random_weight(rng, 512, 200, 4, 128, jnp.bfloat16), gpu)
    x = np.asarray(rng.standard_normal((70, 512)), np.float32)
    x[[5, 69], 100] = np.nan
    x[40, 3] = np.inf
    y = np.asarray(jax.jit(fj.qgemm)(jax.device_put(jnp.asarray(x, jnp.bfloat16), gpu), qw), np.float32)
    bad = np.zeros(70, bool)
    bad[[5, 40, 69]] = True
    assert np.all(~np.isfinite(y[bad])) and np.all(np.isfinite(y[~bad]))


def test_tile_and_decode_kernels_agree(rng, gpu, monkeypatch):
    # Both kernels compute the same function: within the format's tolerance of each other.
    qw = jax.device_put(random_weight(rng, 4096, 1024, 4, 128, jnp.bfloat16), gpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((96, 4096)), jnp.bfloat16), gpu)
    outs = {}
    for path in ("mma", "wgmma"):
        monkeypatch.setenv("FLUTE_JAX_GPU_PATH", path)
        jax.clear_caches()
        outs[path] = np.asarray(jax.jit(fj.qgemm)(x, qw), np.float64)
    err = np.linalg.norm(outs["mma"] - outs["wgmma"]) / np.linalg.norm(outs["mma"])
    assert err < 1e-2
