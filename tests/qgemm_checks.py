"""Correctness checks of qgemm shared by the CPU and the GPU test modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import flute_jax as fj
from conftest import TOLERANCE, random_table, reference_qgemm, rel_error


def random_weight(rng, k: int, n: int, bits: int, group_size: int, dtype, table_kind: str = "random"):
    """A QuantizedWeight with random codes, random (positive and negative) scales and a table."""
    table = random_table(rng, bits) if table_kind == "random" else table_kind
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.5, 2.0, (1, n)).astype(np.float32)
    qw = fj.quantize(w, bits=bits, group_size=group_size, table=table, dtype=dtype)
    # Randomise scales' signs and magnitudes beyond what absmax gives, so the
    # kernels are tested on arbitrary scales, not only positive ones.
    scales = rng.uniform(-2.0, 2.0, qw.scales.shape).astype(np.float32)
    return fj.QuantizedWeight(
        codes=qw.codes, scales=jnp.asarray(scales, dtype), table=qw.table,
        bits=qw.bits, group_size=qw.group_size, shape=qw.shape,
    )


def check_qgemm(rng, device, k, n, lead, bits, group_size, dtype, table_kind="random", repeats=2, epilogue=None):
    """qgemm on `device` against the float64 reference; also bitwise repeatability.
    ``epilogue="swiglu"``: the fused gate, against :func:`reference_swiglu`."""
    dtype = jnp.dtype(dtype)
    qw = jax.device_put(random_weight(rng, k, n, bits, group_size, dtype, table_kind), device)
    x = jax.device_put(jnp.asarray(rng.standard_normal((*lead, k)), dtype), device)
    f = jax.jit(functools.partial(fj.qgemm, epilogue=epilogue))
    y = f(x, qw)
    n_out, reference = (n // 2, reference_swiglu) if epilogue == "swiglu" else (n, reference_qgemm)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    assert list(y.devices())[0].platform == device.platform
    ref = reference(np.asarray(x).reshape(-1, k), qw).reshape(*lead, n_out)
    err = rel_error(np.asarray(y), ref)
    assert np.all(np.isfinite(np.asarray(y, np.float32))), "non-finite output on finite input"
    assert err <= TOLERANCE[dtype.name], f"rel error {err:.3g} > {TOLERANCE[dtype.name]} for {dtype.name}"
    for _ in range(repeats - 1):
        again = np.asarray(f(x, qw))
        assert np.array_equal(again.view(np.uint8), np.asarray(y).view(np.uint8)), "not bitwise repeatable"
    return err


def reference_swiglu(x, qw) -> np.ndarray:
    """float64 ``silu(x @ gate) * (x @ up)`` of a weight in the swiglu epilogue's column order."""
    h = reference_qgemm(x, qw)
    blocks = h.reshape(h.shape[0], -1, 2, 8)
    gate, up = blocks[:, :, 0].reshape(h.shape[0], -1), blocks[:, :, 1].reshape(h.shape[0], -1)
    return gate / (1.0 + np.exp(-gate)) * up


def check_swiglu(rng, device, k, n, lead, bits, group_size, dtype, repeats=2):
    """qgemm(..., epilogue="swiglu") on `device` against the float64 reference, bitwise repeatable."""
    return check_qgemm(rng, device, k, n, lead, bits, group_size, dtype, repeats=repeats, epilogue="swiglu")
