"""qgemm on CPU against the float64 reference over bits x group sizes x dtypes x shapes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import reference_qgemm, rel_error
from qgemm_checks import check_qgemm, random_weight

CPU = jax.devices("cpu")[0]
BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256, -1)
DTYPES = ("float16", "bfloat16", "float32")
SHAPES = ((1000, 300), (72, 8), (513, 17), (256, 16))
LEADS = ((1,), (3,), (17,), (64,), (2, 3), (4, 1, 5))


@pytest.mark.parametrize("bits,group_size,dtype", list(itertools.product(BITS, GROUP_SIZES, DTYPES)))
def test_qgemm_matches_reference(rng, bits, group_size, dtype):
    # Each combination sees two shapes and two leading-dim patterns, rotated so the
    # whole grid covers every shape and every M.
    i = BITS.index(bits) * 7 + GROUP_SIZES.index(group_size) * 3 + DTYPES.index(dtype)
    for j in range(2):
        k, n = SHAPES[(i + j) % len(SHAPES)]
        lead = LEADS[(i + 3 * j) % len(LEADS)]
        check_qgemm(rng, CPU, k, n, lead, bits, group_size, dtype)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("table", ["nf", "int", "fp"])
def test_every_m_and_named_table(rng, m, table):
    check_qgemm(rng, CPU, 1000, 300, (m,), 4, 128, "bfloat16", table_kind=table)


def test_large_k_single_group(rng):
    check_qgemm(rng, CPU, 4100, 40, (5,), 3, -1, "float32")


def test_one_dimensional_x(rng):
    qw = random_weight(rng, 100, 24, 4, 32, jnp.float32)
    x = jnp.asarray(rng.standard_normal(100), jnp.float32)
    y = fj.qgemm(x, qw)
    assert y.shape == (24,)
    assert rel_error(np.asarray(y), reference_qgemm(np.asarray(x)[None], qw)[0]) < 1e-5


def test_empty_batch_returns_empty(rng):
    qw = random_weight(rng, 64, 32, 2, 32, jnp.bfloat16)
    for lead in [(0,), (3, 0), (0, 5)]:
        y = jax.jit(fj.qgemm)(jnp.zeros((*lead, 64), jnp.bfloat16), qw)
        assert y.shape == (*lead, 32) and y.dtype == jnp.bfloat16


def test_scales_cast_to_activation_dtype(rng):
    qw = random_weight(rng, 300, 40, 4, 64, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 300)), jnp.float32)
    y = fj.qgemm(x, qw)
    assert y.dtype == jnp.float32
    assert rel_error(np.asarray(y), reference_qgemm(np.asarray(x), qw)) < 1e-5


def test_nan_and_inf_propagate(rng):
    qw = random_weight(rng, 300, 40, 4, 64, jnp.float32)
    x = np.asarray(rng.standard_normal((4, 300)), np.float32)
    x[1, 7] = np.nan
    x[2, 299] = np.inf
    y = np.asarray(fj.qgemm(jnp.asarray(x), qw))
    ref = reference_qgemm(x, qw)
    assert np.all(np.isnan(y[1]))
    # Inf times a non-zero weight is +-Inf, times a zero weight NaN: IEEE, like the reference.
    assert np.array_equal(np.isnan(y[2]), np.isnan(ref[2]))
    assert np.array_equal(np.isinf(y[2]), np.isinf(ref[2]))
    assert np.all(np.isfinite(y[[0, 3]]))


def test_matches_dense_dot_of_dequantized(rng):
    w = rng.standard_normal((512, 96)).astype(np.float32)
    qw = fj.quantize(w, bits=4, group_size=64, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((8, 512)), jnp.float32)
    dense = np.asarray(x, np.float64) @ np.asarray(fj.dequantize(qw), np.float64)
    assert rel_error(np.asarray(fj.qgemm(x, qw)), dense) < 1e-5
