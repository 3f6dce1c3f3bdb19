"""qgemm under JAX transformations: vmap, scan, jvp/vjp, check_grads, jit, remat, export.

Every result is compared with a float64 NumPy computation from the unpacked
codes (conftest.reference_qgemm and the gradient formulas below), on fresh
random data with odd shapes (K, N not multiples of the packed blocks).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, random_table, reference_qgemm, rel_error
from jax.test_util import check_grads

import flute_jax as fj


def _weight(rng, k, n, *, bits=4, group_size=64, dtype=jnp.float32, table="nf"):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return fj.quantize(w, bits=bits, group_size=group_size, table=table, dtype=dtype)


def _x(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _stack(qws):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *qws)


def _index(qw, i):
    return jax.tree.map(lambda a: a[i], qw)


def _f64_parts(qw):
    """codes int64[K, N], table float64[T], per-row scales float64[K, N]."""
    codes = np.asarray(fj.layout.unpack(qw.codes, qw.bits, qw.shape)).astype(np.int64)
    table = np.asarray(qw.table.astype(jnp.float32), np.float64)
    scales = np.asarray(qw.scales.astype(jnp.float32), np.float64)
    rows = np.repeat(scales, qw.group_rows, axis=0)[: qw.shape[0]]
    return codes, table, rows


def _reference_vjp(x, qw, ct):
    """float64 cotangents of x, scales and table for y = x @ W_hat."""
    codes, table, rows = _f64_parts(qw)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ct64 = np.asarray(ct.astype(jnp.float32), np.float64)
    ct_x = ct64 @ (table[codes] * rows).T
    p = x64.T @ ct64  # [K, N]
    k, n = qw.shape
    g = qw.scales.shape[0]
    by_row = np.zeros((g * qw.group_rows, n))
    by_row[:k] = p * table[codes]
    ct_s = by_row.reshape(g, qw.group_rows, n).sum(axis=1)
    ct_t = np.bincount(codes.ravel(), weights=(p * rows).ravel(), minlength=table.size)
    return ct_x, ct_s, ct_t


def _with(qw, scales=None, table=None):
    return dataclasses.replace(
        qw, scales=qw.scales if scales is None else scales, table=qw.table if table is None else table
    )


def _rel(a, ref):
    return rel_error(jnp.asarray(a), np.asarray(ref, np.float64))


# ---------------------------------------------------------------- vmap / scan


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_vmap_over_x_batch_axes(rng, axis):
    qw = _weight(rng, 300, 40, bits=3, group_size=32)
    x = _x(rng, (4, 5, 300)) if axis < 2 else _x(rng, (4, 300, 5)).transpose(0, 2, 1)
    xb = jnp.moveaxis(x, 0, axis) if axis < 2 else jnp.moveaxis(x, 0, 1)
    in_axis = axis if axis < 2 else 1
    y = jax.vmap(fj.qgemm, in_axes=(in_axis, None))(xb, qw)
    assert y.shape == (4, 5, 40)
    assert _rel(y, reference_qgemm(x, qw)) < TOLERANCE["float32"]
    # Folding the batch into M computes exactly what the unbatched call computes.
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fj.qgemm(x, qw)))


def test_nested_vmap_and_jit(rng):
    qw = _weight(rng, 200, 24, dtype=jnp.bfloat16)
    x = _x(rng, (2, 3, 7, 200), jnp.bfloat16)
    f = jax.jit(jax.vmap(jax.vmap(fj.qgemm, in_axes=(0, None)), in_axes=(0, None)))
    y = f(x, qw)
    assert y.shape == (2, 3, 7, 24) and y.dtype == jnp.bfloat16
    assert _rel(y, reference_qgemm(x, qw)) < TOLERANCE["bfloat16"]


@pytest.mark.parametrize("x_batched", [False, True])
def test_vmap_over_stacked_weights(rng, x_batched):
    experts = [_weight(rng, 260, 33, bits=b, group_size=64) for b in (4, 4, 4)]
    # Different tables per expert, as learned tables would be.
    experts = [_with(e, table=jnp.asarray(random_table(rng, 4), jnp.float32)) for e in experts]
    stacked = _stack(experts)
    x = _x(rng, (3, 6, 260)) if x_batched else _x(rng, (6, 260))
    y = jax.vmap(fj.qgemm, in_axes=(0 if x_batched else None, 0))(x, stacked)
    assert y.shape == (3, 6, 33)
    for i, e in enumerate(experts):
        xi = x[i] if x_batched else x
        assert _rel(y[i], reference_qgemm(xi, e)) < TOLERANCE["float32"]


def test_vmap_over_scales_only(rng):
    qw = _weight(rng, 128, 20, group_size=32)
    scales = jnp.stack([qw.scales * (1.0 + i) for i in range(3)])
    in_axes = dataclasses.replace(qw, codes=None, scales=0, table=None)
    stacked = _with(qw, scales=scales)
    x = _x(rng, (5, 128))
    y = jax.vmap(fj.qgemm, in_axes=(None, in_axes))(x, stacked)
    for i in range(3):
        assert _rel(y[i], reference_qgemm(x, _with(qw, scales=scales[i]))) < TOLERANCE["float32"]


def test_vmap_of_quantize_then_qgemm(rng):
    ws = rng.standard_normal((2, 96, 48)).astype(np.float32)
    stacked = jax.vmap(lambda w: fj.quantize(w, bits=2, group_size=32, table="int", dtype=jnp.float32))(ws)
    x = _x(rng, (3, 96))
    y = jax.vmap(fj.qgemm, in_axes=(None, 0))(x, stacked)
    for i in range(2):
        assert _rel(y[i], reference_qgemm(x, _index(stacked, i))) < TOLERANCE["float32"]


def test_scan_over_stacked_layers(rng):
    layers = [_weight(rng, 64, 64, bits=4, group_size=32) for _ in range(3)]
    stacked = _stack(layers)
    x = _x(rng, (5, 64)) * 0.3

    def step(h, qw):
        return jnp.tanh(fj.qgemm(h, qw)), None

    y, _ = jax.jit(lambda x, s: jax.lax.scan(step, x, s))(x, stacked)
    h = np.asarray(x, np.float64)
    for qw in layers:
        h = np.tanh(reference_qgemm(jnp.asarray(h, jnp.float32), qw))
    assert _rel(y, h) < 1e-5


# ------------------------------------------------------------------ autodiff


@pytest.mark.parametrize("bits,group_size,k,n", [(4, 64, 300, 40), (3, -1, 130, 17), (2, 128, 257, 48)])
def test_vjp_matches_float64(rng, bits, group_size, k, n):
    qw = _weight(rng, k, n, bits=bits, group_size=group_size, table=random_table(rng, bits))
    x = _x(rng, (6, k))
    ct = _x(rng, (6, n))

    def f(x, scales, table):
        return fj.qgemm(x, _with(qw, scales, table))

    y, vjp = jax.vjp(f, x, qw.scales, qw.table)
    ct_x, ct_s, ct_t = vjp(ct)
    ref_x, ref_s, ref_t = _reference_vjp(x, qw, ct)
    assert _rel(y, reference_qgemm(x, qw)) < TOLERANCE["float32"]
    assert ct_x.shape == x.shape and ct_s.shape == qw.scales.shape and ct_t.shape == qw.table.shape
    assert _rel(ct_x, ref_x) < 1e-5
    assert _rel(ct_s, ref_s) < 1e-5
    assert _rel(ct_t, ref_t) < 1e-5


def test_jvp_matches_float64(rng):
    qw = _weight(rng, 300, 40, bits=4, group_size=32, table=random_table(rng, 4))
    x, dx = _x(rng, (4, 300)), _x(rng, (4, 300))
    ds, dt = _x(rng, qw.scales.shape), _x(rng, qw.table.shape)

    def f(x, scales, table):
        return fj.qgemm(x, _with(qw, scales, table))

    _, dy = jax.jvp(f, (x, qw.scales, qw.table), (dx, ds, dt))
    codes, table, rows = _f64_parts(qw)
    ds_rows = np.repeat(np.asarray(ds, np.float64), 32, axis=0)[:300]
    x64, dx64 = np.asarray(x, np.float64), np.asarray(dx, np.float64)
    ref = dx64 @ (table[codes] * rows) + x64 @ (table[codes] * ds_rows)
    ref = ref + x64 @ (np.asarray(dt, np.float64)[codes] * rows)
    assert _rel(dy, ref) < 1e-5


def test_check_grads_first_and_second_order(rng):
    qw = _weight(rng, 40, 12, bits=3, group_size=32, table=random_table(rng, 3))
    x = _x(rng, (3, 40)) * 0.2

    def f(x, scales, table):
        # A smooth, O(1) function of the product, so float32 finite differences are meaningful.
        return jnp.tanh(fj.qgemm(x, _with(qw, scales, table)))

    check_grads(f, (x, qw.scales, qw.table), order=2, modes=("fwd", "rev"), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_codes_get_no_gradient(rng):
    qw = _weight(rng, 64, 16, group_size=32)
    x = _x(rng, (2, 64))
    ct = jnp.ones((2, 16), jnp.float32)
    grads = jax.grad(lambda w: jnp.sum(fj.qgemm(x, w)), allow_int=True)(qw)
    assert grads.codes.dtype == jax.dtypes.float0
    _, ref_s, ref_t = _reference_vjp(x, qw, ct)
    assert _rel(grads.scales, ref_s) < 1e-5 and _rel(grads.table, ref_t) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grad_half_precision(rng, dtype):
    qw = _weight(rng, 200, 32, dtype=dtype, group_size=64)
    x = _x(rng, (5, 200), dtype)
    ct = _x(rng, (5, 32), dtype)
    _, vjp = jax.vjp(lambda x, s, t: fj.qgemm(x, _with(qw, s, t)), x, qw.scales, qw.table)
    got = vjp(ct)
    for g, ref, leaf in zip(got, _reference_vjp(x, qw, ct), (x, qw.scales, qw.table)):
        assert g.dtype == leaf.dtype
        assert _rel(g, ref) < 3 * TOLERANCE[dtype]


def test_grad_is_deterministic(rng):
    qw = _weight(rng, 300, 40, bits=4, group_size=64)
    x = _x(rng, (7, 300))
    g = jax.jit(jax.grad(lambda x, s, t: jnp.sum(jnp.sin(fj.qgemm(x, _with(qw, s, t)))), argnums=(0, 1, 2)))
    first = g(x, qw.scales, qw.table)
    for a, b in zip(first, g(x, qw.scales, qw.table)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_remat_gives_same_gradient(rng):
    layers = _stack([_weight(rng, 64, 64, group_size=32) for _ in range(2)])
    x = _x(rng, (4, 64)) * 0.3

    def loss(x, scales, remat):
        def step(h, w):
            body = lambda h, w: jnp.tanh(fj.qgemm(h, w))  # noqa: E731
            return (jax.checkpoint(body) if remat else body)(h, w), None

        h, _ = jax.lax.scan(step, x, _with(layers, scales))
        return jnp.sum(h**2)

    plain = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, layers.scales, False)
    remat = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, layers.scales, True)
    # XLA fuses the two programs differently (on GPU the float32 reductions of the
    # backward pass change order), so equal to float32 accuracy, not bitwise. The
    # scale gradients are sums with cancellation: bound the difference relative to
    # the gradient's magnitude, not to each (possibly tiny) element.
    for a, b in zip(plain, remat):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # The rematerialized program recomputes the forward kernel in the backward pass.
    def kernel_calls(remat):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2).lower(x, layers.scales, remat)
        return lowered.compile().as_text().count('custom_call_target="flute_qgemm"')

    assert kernel_calls(True) > kernel_calls(False) >= 1


# -------------------------------------------------------------- jit / export


def test_single_device_jit_is_one_custom_call(rng):
    qw = _weight(rng, 300, 40, dtype=jnp.bfloat16)
    x = _x(rng, (2, 3, 300), jnp.bfloat16)
    hlo = jax.jit(fj.qgemm).lower(x, qw).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    # A result type is one token, or a tuple "(bf16[..], u8[..])" on CUDA (workspace).
    ops = re.findall(r"= (?:\([^)]*\)|\S+) ([a-z-]+)\(", entry)
    assert ops.count("custom-call") == 1 and 'custom_call_target="flute_qgemm"' in entry
    # Nothing else runs: only parameters and layout-free reshapes around the kernel
    # (on CUDA the kernel also returns its workspace, hence get-tuple-element).
    assert set(ops) <= {"parameter", "bitcast", "custom-call", "get-tuple-element"}, ops


def test_export_roundtrip(rng):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    qw = _weight(rng, 200, 24, bits=3, group_size=32)
    x = _x(rng, (4, 200))

    def f(x, qw):
        return fj.qgemm(x, qw), jax.grad(lambda x: jnp.sum(fj.qgemm(x, qw) ** 2))(x)

    exported = jax.export.export(jax.jit(f), disabled_checks=fj.export_disabled_checks())(x, qw)
    restored = jax.export.deserialize(exported.serialize())
    y, g = restored.call(x, qw)
    y0, g0 = jax.jit(f)(x, qw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g0))
    assert restored.in_tree == exported.in_tree


def test_export_without_disabled_check_is_refused(rng):
    qw = _weight(rng, 64, 16, group_size=32)
    x = _x(rng, (2, 64))
    with pytest.raises(ValueError, match="flute_qgemm"):
        jax.export.export(jax.jit(fj.qgemm))(x, qw)
