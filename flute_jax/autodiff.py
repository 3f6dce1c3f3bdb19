"""Forward- and reverse-mode differentiation rules for the qgemm primitives.

``y = x @ W_hat`` with ``W_hat[k, n] = table[codes[k, n]] * scales[k // group_size, n]``
is linear in ``x``, linear in ``scales`` and linear in ``table`` (separately), so
its JVP is the sum of three applications of the primitive itself, one per
tangent, with the other operands at their primal values::

    dy = qgemm(dx, codes, scales, table) + qgemm(x, codes, dscales, table)
         + qgemm(x, codes, scales, dtable)

Forward mode therefore runs on the kernel. Each term is linear in exactly one
operand, and the transpose rule handles that operand:

    x:      ct_x[M, K]     = ct @ W_hat.T                      (dense dot with the dequantized W)
    scales: ct_scales[g, n] = sum_{k in group g} P[k, n] * table[codes[k, n]]
    table:  ct_table[t]    = sum_{k, n : codes[k, n] = t} P[k, n] * scales[k // gs, n]
    with    P[K, N]        = x.T @ ct                          (float32 accumulation)

Codes are integers and get no gradient (their tangent is a symbolic zero).

With an epilogue (:mod:`flute_jax.epilogue`, e.g. ``"swiglu"``) the op is ``e(h)`` with
``h`` the linear qgemm above; its JVP is the fused primal, ``h`` and ``dh`` from the plain
primitive, and ``e``'s own JVP (``jax.numpy``, float32) on them, so the transposes only
ever meet the linear primitive.
The transposes are plain ``jax.numpy`` code, so they shard, vmap and
differentiate again (second order) like any JAX code. Every reduction is an
XLA reduce (no scatter-add), so gradients are deterministic on GPU as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad

from . import epilogue as epilogues
from . import layout


def dot_precision(dtype) -> lax.Precision:
    # float32 dots (gradients, the dense large-M path) should be float32-accurate
    # (no TF32 on GPU); 16-bit operands are exact in any precision mode.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def unpacked_codes(codes: jax.Array, bits: int, k: int, n: int) -> jax.Array:
    """``uint8[K, N]`` codes of a (possibly local, sharded) packed array."""
    return layout.unpack(codes, bits, (k, n))


def expand_scales(scales: jax.Array, group_size: int, k: int) -> jax.Array:
    """``scales[G, N]`` -> one row per input feature, ``float32[K, N]``."""
    return jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)[:k]


def dequantized(codes, scales, table, *, bits: int, group_size: int, k: int) -> jax.Array:
    """``W_hat`` as ``float32[K, N]`` (table and scale products are exact in float32)."""
    n = scales.shape[1]
    values = table.astype(jnp.float32)[unpacked_codes(codes, bits, k, n)]
    return values * expand_scales(scales, group_size, k)


def _weighted_outer(x, ct) -> jax.Array:
    """``P = x.T @ ct`` as ``float32[K, N]``."""
    return lax.dot_general(
        x, ct.astype(x.dtype), (((0,), (0,)), ((), ())),
        precision=dot_precision(x.dtype), preferred_element_type=jnp.float32,
    )


def _transpose_x(ct, codes, scales, table, *, bits, group_size, x_aval):
    k = x_aval.shape[1]
    w_hat = dequantized(codes, scales, table, bits=bits, group_size=group_size, k=k)
    # The dot runs in the activation dtype with float32 accumulation, as the forward kernel.
    ct_x = lax.dot_general(
        ct, w_hat.astype(ct.dtype), (((1,), (1,)), ((), ())),
        precision=dot_precision(ct.dtype), preferred_element_type=jnp.float32,
    )
    return ct_x.astype(x_aval.dtype)


def _transpose_scales(ct, x, codes, table, *, bits, group_size, scales_aval):
    g, n = scales_aval.shape
    k = x.shape[1]
    values = table.astype(jnp.float32)[unpacked_codes(codes, bits, k, n)]
    prod = _weighted_outer(x, ct) * values  # [K, N]
    prod = jnp.pad(prod, ((0, g * group_size - k), (0, 0)))
    return prod.reshape(g, group_size, n).sum(axis=1).astype(scales_aval.dtype)


def _transpose_table(ct, x, codes, scales, *, bits, group_size, table_aval):
    k = x.shape[1]
    n = scales.shape[1]
    c = unpacked_codes(codes, bits, k, n)
    prod = _weighted_outer(x, ct) * expand_scales(scales, group_size, k)  # [K, N]
    # One masked reduction per table entry: deterministic (no scatter-add) and
    # fused by XLA, without materializing a [K, N, 2**bits] one-hot.
    entries = jnp.arange(table_aval.shape[0], dtype=c.dtype)
    per_entry = [jnp.sum(jnp.where(c == entries[t], prod, 0.0)) for t in range(table_aval.shape[0])]
    return jnp.stack(per_entry).astype(table_aval.dtype)


def _explicit_sharding(aval):
    """The aval's NamedSharding if its mesh has Explicit axes (sharding in types), else None."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding


def _auto(fn, out_aval, *args):
    """Run ``fn`` with the partitioner choosing intermediate shardings.

    With Explicit mesh axes every jnp op needs typed shardings, and unpacking
    sharded codes (reshapes across the sharded block axes) has none; the
    transposes below therefore run in Auto mode and return the cotangent with
    the primal operand's sharding.
    """
    sharding = _explicit_sharding(out_aval)
    if sharding is None:
        return fn(*args)
    return jax.sharding.auto_axes(fn, out_sharding=sharding)(*args)


def _zero_tangent(aval):
    return ad.Zero(aval.to_tangent_aval())


def make_jvp(prim: Primitive):
    """The JVP rule of ``prim`` (multilinear in x, scales and table)."""

    def jvp(primals, tangents, *, bits: int, group_size: int, epilogue: str):
        if epilogue != "none":
            return _epilogue_jvp(primals, tangents, bits=bits, group_size=group_size, epilogue=epilogue)
        x, codes, scales, table = primals
        dx, _, dscales, dtable = tangents
        params = dict(bits=bits, group_size=group_size, epilogue="none")
        y = prim.bind(x, codes, scales, table, **params)
        terms = []
        if type(dx) is not ad.Zero:
            terms.append(prim.bind(dx, codes, scales, table, **params))
        if type(dscales) is not ad.Zero:
            terms.append(prim.bind(x, codes, dscales, table, **params))
        if type(dtable) is not ad.Zero:
            terms.append(prim.bind(x, codes, scales, dtable, **params))
        if not terms:
            return y, _zero_tangent(jax.core.get_aval(y))
        dy = terms[0]
        for t in terms[1:]:
            dy = dy + t
        return y, dy

    def _epilogue_jvp(primals, tangents, *, bits, group_size, epilogue):
        y = prim.bind(*primals, bits=bits, group_size=group_size, epilogue=epilogue)  # the fused result
        h, dh = jvp(primals, tangents, bits=bits, group_size=group_size, epilogue="none")
        if type(dh) is ad.Zero:
            return y, _zero_tangent(jax.core.get_aval(y))
        f32 = lambda v: v.astype(jnp.float32)  # noqa: E731  (the kernels apply it in float32)
        _, dy = jax.jvp(lambda v: epilogues.apply(v, epilogue), (f32(h),), (f32(dh),))
        return y, dy.astype(y.dtype)

    return jvp


def _transpose(ct, x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    if epilogue != "none":
        raise ValueError(f"flute_qgemm with epilogue {epilogue!r} is not linear; its JVP uses the plain primitive")
    undefined = [ad.is_undefined_primal(v) for v in (x, codes, scales, table)]
    if undefined[1]:
        raise ValueError("flute_qgemm is not linear in its integer codes; they have no cotangent")
    if sum(undefined) != 1:
        # The JVP rule emits terms linear in exactly one operand.
        raise ValueError("flute_qgemm transpose: expected exactly one linear operand")
    params = dict(bits=bits, group_size=group_size)
    if undefined[0]:
        if type(ct) is ad.Zero:
            return _zero_tangent(x.aval), None, None, None
        rule = functools.partial(_transpose_x, x_aval=x.aval, **params)
        return _auto(rule, x.aval, ct, codes, scales, table), None, None, None
    if undefined[2]:
        if type(ct) is ad.Zero:
            return None, None, _zero_tangent(scales.aval), None
        rule = functools.partial(_transpose_scales, scales_aval=scales.aval, **params)
        return None, None, _auto(rule, scales.aval, ct, x, codes, table), None
    if type(ct) is ad.Zero:
        return None, None, None, _zero_tangent(table.aval)
    rule = functools.partial(_transpose_table, table_aval=table.aval, **params)
    return None, None, None, _auto(rule, table.aval, ct, x, codes, scales)


def register(prim: Primitive) -> None:
    """Install the JVP and transpose rules on a qgemm-signature primitive."""
    ad.primitive_jvps[prim] = make_jvp(prim)
    ad.primitive_transposes[prim] = _transpose
