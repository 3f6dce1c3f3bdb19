"""The four ways to compute ``y = x @ W`` that the benchmark puts side by side.

==========  ===============================================================  =============================
name        what runs                                                        weight bytes streamed
==========  ===============================================================  =============================
flute       ``flute_jax.qgemm`` (packed b-bit codes, group scales, table)    K*N*b/8 + scales + table
xla_dot     XLA ``jnp.dot(x, w)`` with ``w`` in the activation dtype         2*K*N
xla_int4    int4 codes + group scales, dequantized in jnp, then ``jnp.dot``  K*N/2 + scales
            (what a JAX user writes today)
naive_lut   ``table[codes] * scales`` in jnp (uint4 codes), then ``jnp.dot``  K*N/2 + scales + table
==========  ===============================================================  =============================

``xla_int4`` and ``naive_lut`` store 4-bit codes whatever ``bits`` is (XLA has no
packed 2/3-bit type a user would reach for), so their cost does not depend on ``bits``
and the runner measures them once per (M, K, N, group size, dtype); ``xla_dot`` once
per (M, K, N, dtype).

Each method provides: ``make(key)`` -> the arrays of one call (x first, all random);
``fn(*arrays)`` -> y (the function that is jitted and timed: exactly one matmul, so
XLA has nothing to merge); ``reference(config, n0)(*weights)`` -> the float32 weight
``W[:, :n0]`` by the method's own definition, for the correctness check (the runner
multiplies it with x in float64 on the host).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import layout, tables
from ..ops import qgemm
from ..quantize import QuantizedWeight, dequantize, num_groups

METHODS = ("flute", "xla_dot", "xla_int4", "naive_lut")
LABELS = {
    "flute": "flute_jax qgemm",
    "xla_dot": "XLA {dtype} dot",
    "xla_int4": "XLA int4 dequant+dot",
    "naive_lut": "naive LUT gather+dot",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark point. ``group_size`` -1 means one group over all of K."""

    m: int
    k: int
    n: int
    bits: int
    group_size: int
    dtype: str
    shape_name: str = ""


def expand_scales(scales: jax.Array, k: int, group_size: int) -> jax.Array:
    """``[G, N]`` group scales -> ``[K, N]`` (row ``k`` gets group ``k // group_size``)."""
    if group_size == -1:
        return jnp.broadcast_to(scales[:1], (k, scales.shape[1]))
    if k % group_size == 0:
        g, n = scales.shape
        return jnp.broadcast_to(scales[:, None, :], (g, group_size, n)).reshape(k, n)
    return jnp.repeat(scales, group_size, axis=0)[:k]


# Random data. Each helper is jitted with static shapes, so it compiles once per
# (shape, dtype) and is reused by every method, M and weight set of the sweep (compiling a
# generator per measurement would cost more GPU time than the measurement itself).
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape: tuple, dtype: str, scale: float = 1.0) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _bits(key, shape: tuple, dtype: str) -> jax.Array:
    return jax.random.bits(key, shape, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _codes(key, shape: tuple, low: int, high: int, dtype: str) -> jax.Array:
    # via int8 / uint8: the 4-bit types cannot be drawn directly
    wide = jnp.int8 if low < 0 else jnp.uint8
    return jax.random.randint(key, shape, low, high, wide).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scales_of(key, shape: tuple, dtype: str, k: int) -> jax.Array:
    # Positive, varied, of the size a trained layer has (absmax scaling of N(0, 1/K) weights).
    return (jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5) * (3.0 / math.sqrt(k))).astype(dtype)


def _x(key, c: Config) -> jax.Array:
    return _normal(key, (c.m, c.k), c.dtype)


def _scales(key, c: Config) -> jax.Array:
    return _scales_of(key, (num_groups(c.k, c.group_size), c.n), c.dtype, c.k)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    make: Callable  # (key, config) -> tuple of arrays, x first
    fn: Callable  # (config) -> f(*arrays) -> y
    reference: Callable  # (config, n0) -> f(*weights) -> float32 W[:, :n0]
    cache_fields: tuple  # Config fields the timing depends on

    def cache_key(self, c: Config) -> tuple:
        return (self.name, *(getattr(c, f) for f in self.cache_fields))

    def label(self, dtype: str) -> str:
        return LABELS[self.name].format(dtype="bf16" if dtype == "bfloat16" else "fp16" if dtype == "float16" else dtype)


# ---------------------------------------------------------------- flute_jax qgemm
def _flute_make(key, c: Config):
    kx, kc, ks = jax.random.split(key, 3)
    shape = layout.packed_shape(c.k, c.n, c.bits)
    if c.k % layout.BLOCK_K == 0 and c.n % layout.BLOCK_N == 0:
        # Without padding, pack() is a bijection between random codes and random words:
        # drawing the words directly gives the same distribution without a [K, N] temporary.
        codes = _bits(kc, shape, "uint32")
    else:
        codes = _pack(_codes(kc, (c.k, c.n), 0, 2**c.bits, "uint8"), c.bits)
    table = jnp.asarray(tables.nf(c.bits), c.dtype)
    return _x(kx, c), codes, _scales(ks, c), table


_pack = jax.jit(layout.pack, static_argnums=1)


def _flute_weight(c: Config, codes, scales, table, n: int) -> QuantizedWeight:
    return QuantizedWeight(codes, scales, table, bits=c.bits, group_size=c.group_size, shape=(c.k, n))


def _flute_fn(c: Config):
    def flute(x, codes, scales, table):
        return qgemm(x, _flute_weight(c, codes, scales, table, c.n))

    return flute


def _flute_ref(c: Config, n0: int):
    def ref(codes, scales, table):
        nb = -(-n0 // layout.BLOCK_N)  # whole N-blocks of the packed layout are valid weights
        return dequantize(_flute_weight(c, codes[:, :nb], scales[:, :n0], table, n0), jnp.float32)

    return ref


# ---------------------------------------------------------------- XLA dot
def _dot_make(key, c: Config):
    kx, kw = jax.random.split(key)
    w = _normal(kw, (c.k, c.n), c.dtype, 1.0 / math.sqrt(c.k))
    return _x(kx, c), w


def _dot_fn(c: Config):
    def xla_dot(x, w):
        return jnp.dot(x, w)

    return xla_dot


def _dot_ref(c: Config, n0: int):
    def ref(w):
        return w[:, :n0].astype(jnp.float32)

    return ref


# ---------------------------------------------------------------- XLA int4 dequantize + dot
def _int4_make(key, c: Config):
    kx, kc, ks = jax.random.split(key, 3)
    codes = _codes(kc, (c.k, c.n), -8, 8, "int4")
    return _x(kx, c), codes, _scales(ks, c)


def _int4_fn(c: Config):
    def xla_int4(x, codes, scales):
        w = codes.astype(x.dtype) * expand_scales(scales, c.k, c.group_size)
        return jnp.dot(x, w)

    return xla_int4


def _int4_ref(c: Config, n0: int):
    def ref(codes, scales):
        return codes[:, :n0].astype(jnp.float32) * expand_scales(scales[:, :n0].astype(jnp.float32), c.k, c.group_size)

    return ref


# ---------------------------------------------------------------- naive LUT gather + dot
def _lut_make(key, c: Config):
    kx, kc, ks = jax.random.split(key, 3)
    codes = _codes(kc, (c.k, c.n), 0, 16, "uint4")
    table = jnp.asarray(tables.nf(4), c.dtype)
    return _x(kx, c), codes, _scales(ks, c), table


def _lut_fn(c: Config):
    def naive_lut(x, codes, scales, table):
        w = table[codes.astype(jnp.int32)] * expand_scales(scales, c.k, c.group_size)
        return jnp.dot(x, w)

    return naive_lut


def _lut_ref(c: Config, n0: int):
    def ref(codes, scales, table):
        t = table.astype(jnp.float32)[codes[:, :n0].astype(jnp.int32)]
        return t * expand_scales(scales[:, :n0].astype(jnp.float32), c.k, c.group_size)

    return ref


REGISTRY = {
    "flute": Method("flute", _flute_make, _flute_fn, _flute_ref, ("m", "k", "n", "bits", "group_size", "dtype")),
    "xla_dot": Method("xla_dot", _dot_make, _dot_fn, _dot_ref, ("m", "k", "n", "dtype")),
    "xla_int4": Method("xla_int4", _int4_make, _int4_fn, _int4_ref, ("m", "k", "n", "group_size", "dtype")),
    "naive_lut": Method("naive_lut", _lut_make, _lut_fn, _lut_ref, ("m", "k", "n", "group_size", "dtype")),
}


def array_bytes(shape_dtype) -> int:
    """Bytes of an array (or ShapeDtypeStruct); sub-byte types count their bits (int4: 1/2)."""
    bits = jnp.dtype(shape_dtype.dtype).itemsize * 8
    if jnp.dtype(shape_dtype.dtype).name in ("int4", "uint4"):
        bits = 4
    elif jnp.dtype(shape_dtype.dtype).name in ("int2", "uint2"):
        bits = 2
    return -(-int(np.prod(shape_dtype.shape, dtype=np.int64)) * bits // 8)
