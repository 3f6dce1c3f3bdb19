"""The fused SwiGLU epilogue on the CUDA kernels (skipped without a GPU): every path
(decode kernel, tile kernel, dense path, the simple kernel of float32 x), split Stream-K
columns, two N-blocks per warp, both 16-bit dtypes, bits 2/3/4, against the float64
reference, bitwise repeatable.

    pytest -q tests/test_gpu_epilogue.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_available
from qgemm_checks import check_swiglu, random_weight, reference_swiglu

import flute_jax as fj
from flute_jax import _ffi

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]

# (K, N), N a multiple of 16: a partial 128-feature column (304), partial 256-k units (1000,
# 513), columns split over many Stream-K parts at small M (4096 x 4096, 8192 x 256).
SHAPES = ((1000, 304), (4096, 128), (2304, 1040), (513, 32), (4096, 4096), (8192, 256))
DTYPES = ("bfloat16", "float16")
GROUP_SIZES = (64, 128, -1, 32)


def _cases(ms):
    """One (K, N, bits, group size, dtype) per M, rotating so every shape, bits and dtype occurs."""
    for i, (m, bits) in enumerate(itertools.product(ms, (2, 3, 4))):
        k, n = SHAPES[i % len(SHAPES)]
        yield m, k, n, bits, GROUP_SIZES[i % len(GROUP_SIZES)], DTYPES[(i // len(SHAPES)) % 2]


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


@pytest.fixture(scope="module", autouse=True)
def _fresh_lowerings():
    jax.clear_caches()  # the path is chosen at lowering time
    yield
    jax.clear_caches()


@pytest.mark.parametrize("m,k,n,bits,group_size,dtype", list(_cases((1, 3, 8, 16, 32))))
def test_decode_kernel(monkeypatch, rng, gpu, m, k, n, bits, group_size, dtype):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "mma")
    check_swiglu(rng, gpu, k, n, (m,), bits, group_size, dtype)


@pytest.mark.parametrize("nb", ["1", "2"])
@pytest.mark.parametrize("m", [1, 5])
def test_decode_kernel_n_blocks(monkeypatch, rng, gpu, nb, m):
    # Two N-blocks per warp (256-feature columns), forced, on a partial last column.
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "mma")
    monkeypatch.setenv("FLUTE_JAX_DECODE_NB", nb)
    check_swiglu(rng, gpu, 4160, 1040, (m,), 4, 128, "bfloat16")


@pytest.mark.skipif(not (gpu_available() and _ffi.cuda_has_wgmma()), reason="needs a GPU with wgmma (sm_90)")
@pytest.mark.parametrize("m,k,n,bits,group_size,dtype", list(_cases((20, 64, 130, 300))))
def test_tile_kernel(monkeypatch, rng, gpu, m, k, n, bits, group_size, dtype):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "wgmma")
    check_swiglu(rng, gpu, k, n, (m,), bits, group_size, dtype)


@pytest.mark.skipif(not (gpu_available() and _ffi.cuda_has_wgmma()), reason="needs a GPU with wgmma (sm_90)")
@pytest.mark.parametrize("tile", ["32x128", "64x256", "128x128", "128x256"])
def test_tile_kernel_forced_tiles(monkeypatch, rng, gpu, tile):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "wgmma")
    monkeypatch.setenv("FLUTE_JAX_TILE", tile)
    check_swiglu(rng, gpu, 2304, 1040, (150,), 4, 64, "float16")


@pytest.mark.parametrize("m", [5, 600])
def test_dense_path(monkeypatch, rng, gpu, m):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "dense")
    check_swiglu(rng, gpu, 1000, 304, (m,), 4, 64, "bfloat16")


def test_float32_x_runs_the_simple_kernel(rng, gpu):
    check_swiglu(rng, gpu, 513, 208, (7,), 3, 32, "float32")


def test_fused_equals_the_kernel_s_own_projection(monkeypatch, rng, gpu):
    # The epilogue reads the same float32 sums the plain call rounds: silu(h) * h' from the plain
    # call's bits is within one rounding of the fused result (a check that the pairs are right).
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "mma")
    qw16 = jax.device_put(random_weight(rng, 4096, 512, 4, 128, jnp.float16), gpu)
    x16 = jax.device_put(jnp.asarray(rng.standard_normal((3, 4096)), jnp.float16), gpu)
    fused = np.asarray(fj.qgemm(x16, qw16, epilogue="swiglu"), np.float64)
    plain = np.asarray(fj.qgemm(x16, qw16), np.float64).reshape(3, -1, 2, 8)
    g, u = plain[:, :, 0].reshape(3, -1), plain[:, :, 1].reshape(3, -1)
    np.testing.assert_allclose(fused, g / (1 + np.exp(-g)) * u, rtol=4e-3, atol=4e-3 * np.abs(fused).max())
    ref = reference_swiglu(np.asarray(x16), qw16)
    assert np.linalg.norm(fused - ref) / np.linalg.norm(ref) <= 2e-3
