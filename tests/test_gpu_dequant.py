"""The dense GPU path (M above the kernels' range): our dequantize kernel
(csrc/dequant_kernel.cu) against the jax.numpy dequantization, bit for bit, and the
whole path against the float64 reference (skipped without a GPU).

    pytest -q tests/test_gpu_dequant.py
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import gpu_available
from flute_jax import autodiff, dense
from qgemm_checks import check_qgemm, random_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]

# (K, N): partial 256-k units, N not a multiple of 8 or 16, several 128-feature blocks, Llama-sized.
SHAPES = ((300, 6), (1000, 100), (4160, 1000), (72, 8), (513, 24), (4096, 4096))


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


def _kernel(qw, dtype):
    f = functools.partial(dense.dequantize_cuda, bits=qw.bits, group_size=qw.group_rows, k=qw.shape[0])
    return jax.jit(f)(qw.codes, qw.scales.astype(dtype), qw.table.astype(dtype))


def _reference(qw, dtype):
    f = functools.partial(autodiff.dequantized, bits=qw.bits, group_size=qw.group_rows, k=qw.shape[0])
    return jax.jit(lambda c, s, t: f(c, s, t).astype(dtype))(qw.codes, qw.scales.astype(dtype), qw.table.astype(dtype))


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


CASES = [
    (bits, g, dtype, shape)
    for (bits, g, dtype), shape in zip(
        itertools.product((2, 3, 4), (32, 64, 128, 256, -1), ("float16", "bfloat16", "float32")),
        itertools.cycle(SHAPES),
    )
]


@pytest.mark.parametrize("bits,group_size,dtype,shape", CASES)
def test_kernel_equals_jnp_dequantization(rng, gpu, bits, group_size, dtype, shape):
    k, n = shape
    qw = jax.device_put(random_weight(rng, k, n, bits, group_size, jnp.dtype(dtype)), gpu)
    w = _kernel(qw, dtype)
    assert w.shape == (k, n) and w.dtype == jnp.dtype(dtype)
    assert _same_bits(w, _reference(qw, dtype))
    assert _same_bits(w, _kernel(qw, dtype))  # repeatable


@pytest.mark.parametrize("where", ["scales", "table"])
def test_nan_and_inf_propagate(rng, gpu, where):
    k, n = 520, 40
    qw = random_weight(rng, k, n, 4, 64, jnp.bfloat16)
    if where == "scales":
        qw = fj.QuantizedWeight(qw.codes, qw.scales.at[1, 3].set(jnp.nan).at[4, 17].set(jnp.inf), qw.table,
                                bits=4, group_size=64, shape=(k, n))
    else:
        qw = fj.QuantizedWeight(qw.codes, qw.scales, qw.table.at[5].set(jnp.nan).at[9].set(-jnp.inf),
                                bits=4, group_size=64, shape=(k, n))
    qw = jax.device_put(qw, gpu)
    w, ref = np.asarray(_kernel(qw, "bfloat16"), np.float32), np.asarray(_reference(qw, "bfloat16"), np.float32)
    assert np.array_equal(np.isnan(w), np.isnan(ref)) and np.isnan(w).any()
    assert np.array_equal(np.isinf(w), np.isinf(ref)) and np.isinf(w).any()
    finite = np.isfinite(ref)
    assert np.array_equal(w[finite], ref[finite])


@pytest.mark.parametrize(
    "bits,group_size,dtype,k,n,m",
    [
        (4, 128, "bfloat16", 4096, 1000, 1100),
        (3, 64, "float16", 513, 300, 2000),
        (2, -1, "bfloat16", 1000, 24, 1500),
        (4, 32, "float16", 2304, 136, 1025),
        (3, 256, "float32", 300, 40, 1300),
    ],
)
def test_dense_path_against_reference(rng, gpu, monkeypatch, bits, group_size, dtype, k, n, m):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "dense")
    jax.clear_caches()  # the path is read at lowering time
    check_qgemm(rng, gpu, k, n, (m,), bits, group_size, dtype)


def test_dense_path_lowers_to_the_kernel(rng, gpu, monkeypatch):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "dense")
    jax.clear_caches()
    qw = random_weight(rng, 512, 64, 4, 128, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2048, 512), jnp.bfloat16)
    text = jax.jit(fj.qgemm).trace(x, qw).lower().as_text()
    assert "flute_dequantize" in text and "flute_qgemm" not in text
