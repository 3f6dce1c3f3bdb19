"""qgemm on a CUDA GPU against the float64 reference (skipped without a GPU).

Run on a GPU machine with:  pytest -q tests/test_gpu.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from flute_jax import _ffi
from conftest import gpu_available, reference_qgemm, rel_error
from qgemm_checks import check_qgemm, random_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU"),
]

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256, -1)
DTYPES = ("float16", "bfloat16", "float32")
SHAPES = ((1000, 300), (72, 8), (513, 17), (4096, 128))
LEADS = ((1,), (3,), (17,), (64,), (2, 3))


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


@pytest.mark.parametrize("bits,group_size,dtype", list(itertools.product(BITS, GROUP_SIZES, DTYPES)))
def test_qgemm_gpu_matches_reference(rng, gpu, bits, group_size, dtype):
    # Rotated like the CPU test so the grid covers every shape and M without
    # compiling every combination.
    i = BITS.index(bits) * 7 + GROUP_SIZES.index(group_size) * 3 + DTYPES.index(dtype)
    for j in range(2):
        k, n = SHAPES[(i + j) % len(SHAPES)]
        check_qgemm(rng, gpu, k, n, LEADS[(i + 3 * j) % len(LEADS)], bits, group_size, dtype, repeats=3)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
def test_every_shape_and_m(rng, gpu, k, n, lead):
    check_qgemm(rng, gpu, k, n, lead, 4, 128, "bfloat16", table_kind="nf", repeats=3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 12])
def test_group64_flush_period(rng, gpu, bits, m):
    # At group size 64 the decode kernel scales its accumulators every 4 k-tiles (one group),
    # not every 2: K with a partial last unit (one group in it), M of the 8- and 16-row launches.
    check_qgemm(rng, gpu, 4160, 1040, (m,), bits, 64, "bfloat16", repeats=2)
    check_qgemm(rng, gpu, 2112, 72, (m,), bits, 64, "float16", repeats=2)


def test_group64_in_the_32_row_launch(rng, gpu, monkeypatch):
    # The 32-row decode launch keeps the 2-tile flush period at group size 64 (no instance of its own).
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "mma")
    jax.clear_caches()
    check_qgemm(rng, gpu, 2112, 300, (24,), 3, 64, "bfloat16", repeats=2)
    check_qgemm(rng, gpu, 4160, 136, (29,), 4, 64, "float16", repeats=2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 5, 8])
def test_two_nblocks_per_warp(rng, gpu, monkeypatch, bits, m):
    # FLUTE_JAX_DECODE_NB=2: each warp of the 8-row decode launch takes two N-blocks (256-feature
    # Stream-K columns). Last columns of 1, 3 and 5 N-blocks (the second N-block of a warp past N),
    # K with a partial last unit, every group size, both 16-bit dtypes; all shapes the FLUTE
    # kernel takes (K and N multiples of 8).
    monkeypatch.setenv("FLUTE_JAX_DECODE_NB", "2")
    jax.clear_caches()
    cases = [((4160, 1040), 64, "bfloat16"), ((2112, 72), 32, "float16"), ((1000, 296), 128, "bfloat16"),
             ((4096, 4104), -1, "float16"), ((520, 264), 256, "bfloat16")]
    for (k, n), group_size, dtype in cases:
        check_qgemm(rng, gpu, k, n, (m,), bits, group_size, dtype, repeats=2)
        plan = _ffi.cuda_plan(m, k, n, k if group_size == -1 else group_size, bits, dtype)
        assert plan["kernel"] == "flute" and plan["column_n"] == 256, plan
    jax.clear_caches()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 6, 16])
def test_fixup_of_many_parts(rng, gpu, bits, m):
    # Narrow, deep weights: one or three Stream-K columns split over dozens of blocks, so the
    # block that finishes a column last sums 32-64 parts, many batches of the 8-row launch's
    # loads. The last column of N = 264 has one N-block, half of it past N.
    for (k, n), group_size, dtype in (((16384, 128), 128, "bfloat16"), ((8192, 264), 64, "float16")):
        plan = _ffi.cuda_plan(m, k, n, group_size, bits, dtype)
        assert plan["kernel"] == "flute" and plan["grid"] >= 32, plan
        check_qgemm(rng, gpu, k, n, (m,), bits, group_size, dtype, repeats=3)


@pytest.mark.parametrize("bits", BITS)
def test_two_nblocks_rule(gpu, monkeypatch, bits):
    # Without FLUTE_JAX_DECODE_NB, the 8-row launch takes two N-blocks per warp for the 70B
    # gate/up projection (many Stream-K iterations per block), and one for the 8B o
    # projection (few); 16 rows always take one.
    monkeypatch.delenv("FLUTE_JAX_DECODE_NB", raising=False)
    assert _ffi.cuda_plan(1, 8192, 57344, 128, bits, "bfloat16")["column_n"] == 256
    assert _ffi.cuda_plan(8, 8192, 57344, 128, bits, "float16")["column_n"] == 256
    assert _ffi.cuda_plan(1, 8192, 57344, 64, bits, "bfloat16")["column_n"] == 256  # flush period 4
    assert _ffi.cuda_plan(1, 8192, 57344, 32, bits, "float16")["column_n"] == 256  # flush period 2
    assert _ffi.cuda_plan(1, 4096, 4096, 128, bits, "bfloat16")["column_n"] == 128
    assert _ffi.cuda_plan(16, 8192, 57344, 128, bits, "bfloat16")["column_n"] == 128
    monkeypatch.setenv("FLUTE_JAX_DECODE_NB", "1")
    assert _ffi.cuda_plan(1, 8192, 57344, 128, bits, "bfloat16")["column_n"] == 128


def test_gpu_equals_cpu_function(rng, gpu):
    # Same inputs on both platforms: both within tolerance of the reference and of each other.
    qw = random_weight(rng, 777, 99, 3, 64, jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 777)), jnp.float32)
    y_cpu = np.asarray(jax.jit(fj.qgemm)(jax.device_put(x, jax.devices("cpu")[0]),
                                         jax.device_put(qw, jax.devices("cpu")[0])))
    y_gpu = np.asarray(jax.jit(fj.qgemm)(jax.device_put(x, gpu), jax.device_put(qw, gpu)))
    ref = reference_qgemm(np.asarray(x), qw)
    assert rel_error(y_cpu, ref) < 1e-5 and rel_error(y_gpu, ref) < 1e-5


def test_gpu_nan_propagates(rng, gpu):
    qw = jax.device_put(random_weight(rng, 512, 64, 4, 128, jnp.bfloat16), gpu)
    x = np.asarray(rng.standard_normal((3, 512)), np.float32)
    x[1, 100] = np.nan
    y = np.asarray(jax.jit(fj.qgemm)(jax.device_put(jnp.asarray(x, jnp.bfloat16), gpu), qw), np.float32)
    assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))


def test_gpu_empty_batch(rng, gpu):
    qw = jax.device_put(random_weight(rng, 256, 32, 2, 64, jnp.float16), gpu)
    y = jax.jit(fj.qgemm)(jax.device_put(jnp.zeros((0, 256), jnp.float16), gpu), qw)
    assert y.shape == (0, 32)


@pytest.mark.parametrize("bits,dtype", [(4, "bfloat16"), (3, "float16"), (2, "float32")])
def test_large_m_takes_the_dense_path(rng, gpu, monkeypatch, bits, dtype):
    # Above the tile kernel's largest M (KERNEL_MAX_M without wgmma) the CUDA lowering
    # dequantizes once and runs XLA's dot.
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH", raising=False)
    tile_max = fj.dispatch.tile_max_m(fj.dispatch.gpu_device_kind())
    m = (tile_max if _ffi.cuda_has_wgmma() else fj.dispatch.KERNEL_MAX_M) + 72
    x = jax.ShapeDtypeStruct((m, 520), jnp.dtype(dtype))
    qw = random_weight(rng, 520, 136, bits, 64, jnp.dtype(dtype))
    assert "flute_qgemm" not in jax.jit(fj.qgemm).trace(x, qw).lower().as_text()
    check_qgemm(rng, gpu, 520, 136, (m,), bits, 64, dtype, repeats=3)
