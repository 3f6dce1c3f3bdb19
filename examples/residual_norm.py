"""A residual add and the RMSNorm after it as one Pallas kernel (NVIDIA GPUs).

    total, normed = add_rms_norm(x, delta, scale, eps)

A pre-norm decoder layer adds each sublayer's output to the residual stream and normalizes
the sum for the next sublayer. In a decode step that is a vector per sequence: the work is
nothing, the kernel launches are the cost. XLA compiles it, at one row per sequence, as two
kernels on an H200 (the add with the sum of squares, then the normalization), 64 per step of
an 8B model. Here one program per row reads x and delta once, writes their sum (the new
residual stream) and the normalized row.

Numerics follow ``llama.py``'s RMSNorm: the sum rounded to the activations' dtype; mean of
squares, reciprocal square root and product in float32; the normalized row rounded to the
dtype, then multiplied by ``scale`` and rounded again. Results agree with XLA's within a
rounding of the dtype (XLA sums the squares in another order), not bitwise.

On CPU the kernel runs in Pallas' interpreter (``interpret=True``), which the CPU tests use;
the Llama example takes XLA's ops there.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _add_norm_kernel(x_ref, delta_ref, scale_ref, total_ref, normed_ref, *, eps: float):
    """One row: x_ref, delta_ref [D] -> total_ref = x + delta, normed_ref = RMSNorm(total) * scale."""
    total = (x_ref[...].astype(jnp.float32) + delta_ref[...].astype(jnp.float32)).astype(total_ref.dtype)
    total_ref[...] = total
    _normalize(total, scale_ref, normed_ref, eps)


def _norm_kernel(x_ref, scale_ref, normed_ref, *, eps: float):
    """One row without a residual add."""
    _normalize(x_ref[...], scale_ref, normed_ref, eps)


def _normalize(row, scale_ref, normed_ref, eps: float):
    xf = row.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf) + eps)).astype(normed_ref.dtype)
    normed_ref[...] = (scale_ref[...].astype(jnp.float32) * normed.astype(jnp.float32)).astype(normed_ref.dtype)


def fits(x: jax.Array, scale: jax.Array) -> bool:
    """Whether the kernel takes x [..., D] and scale [D]: float16 or bfloat16, D a power of two
    from 16 to 65536 (Triton's blocks are powers of two, and a row is one block)."""
    d = x.shape[-1]
    return (x.dtype in (jnp.bfloat16, jnp.float16) and scale.shape == (d,) and 16 <= d <= 65536
            and not d & (d - 1))


def add_rms_norm(x: jax.Array, delta: Optional[jax.Array], scale: jax.Array, eps: float,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Residual add and RMSNorm in one kernel.

    x, delta [..., D] in float16 or bfloat16 (delta None: no add); scale [D] (any float
    dtype); D a power of two (:func:`fits`). Returns (total = x + delta [..., D] in x's
    dtype, or x itself without delta; RMSNorm(total) * scale [..., D] in x's dtype).
    ``interpret``: run in Pallas' interpreter (CPU).
    """
    if not fits(x, scale):
        raise ValueError(f"add_rms_norm takes float16/bfloat16 rows of a power-of-two length from 16 to 65536 and "
                         f"a scale of that length; got x {x.shape} {x.dtype}, scale {scale.shape}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta must match x: {delta.shape} {delta.dtype} against {x.shape} {x.dtype}")
    d = x.shape[-1]
    rows = x.size // d
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    whole = pl.BlockSpec((d,), lambda i: (0,))
    out_row = jax.ShapeDtypeStruct((rows, d), x.dtype)
    params = dict(grid=(rows,), compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 4096 else 8, num_stages=1),
                  interpret=interpret)
    if delta is None:
        normed = pl.pallas_call(lambda *refs: _norm_kernel(*refs, eps=eps), in_specs=[row, whole], out_specs=row,
                                out_shape=out_row, name="rms_norm", **params)(x.reshape(rows, d), scale)
        return x, normed.reshape(x.shape)
    total, normed = pl.pallas_call(lambda *refs: _add_norm_kernel(*refs, eps=eps), in_specs=[row, row, whole],
                                   out_specs=(row, row), out_shape=(out_row, out_row), name="add_rms_norm",
                                   **params)(x.reshape(rows, d), delta.reshape(rows, d), scale)
    return total.reshape(x.shape), normed.reshape(x.shape)
