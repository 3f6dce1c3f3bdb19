"""Public ``qgemm(x, qw)``: validation, leading dims, dtype handling."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from . import epilogue as epilogues
from .sharding import local_weight, qgemm_spmd_p
from .quantize import QuantizedWeight, check_activation_dtype


def qgemm(x: jax.Array, qw: QuantizedWeight, *, epilogue: Optional[str] = None) -> jax.Array:
    """``y = x @ W_hat`` for a LUT-quantized weight, optionally with a fused epilogue.

    Args:
      x: ``[..., K]`` float16, bfloat16 or float32.
      qw: a :class:`QuantizedWeight` of logical shape ``(K, N)``.
      epilogue: ``None``, or ``"swiglu"``: ``silu(x @ gate) * (x @ up)`` for a gate/up weight
        whose columns alternate in blocks of 8 (:func:`flute_jax.epilogue.interleave_gate_up`;
        N a multiple of 16), applied to the float32 accumulators.
    Returns:
      ``[..., N]`` in x's dtype (``[..., N / 2]`` with ``"swiglu"``); float32 accumulation,
      one rounding. Scales and table are cast to x's dtype if they are stored in another one.
    Raises:
      TypeError / ValueError at trace time for a bad dtype, shape, weight or epilogue.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a flute_jax.QuantizedWeight, got {type(qw).__name__}")
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    check_activation_dtype(x.dtype, "x dtype")
    # Inside shard_map the leaves are a device's slice of whole blocks: validate
    # them as a weight of the local shape (K from x, N from the scales).
    qw = local_weight(qw, x.shape[-1] if x.ndim else 0)
    k, n = qw.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] for a weight of shape {qw.shape}, got {x.shape}")
    epilogue = epilogues.check_epilogue(epilogue)
    epilogues.check_columns(n, epilogue)
    lead = x.shape[:-1]
    m = math.prod(lead)
    n_out = epilogues.output_columns(n, epilogue)
    if m == 0:
        return jnp.zeros((*lead, n_out), x.dtype)
    # qgemm_spmd_p carries the vmap / AD rules and lowers through custom_partitioning
    # (a plain kernel call on one device or inside shard_map).
    y = qgemm_spmd_p.bind(
        x.reshape(m, k),
        qw.codes,
        qw.scales.astype(x.dtype),
        qw.table.astype(x.dtype),
        bits=qw.bits,
        group_size=qw.group_rows,
        epilogue=epilogue,
    )
    return y.reshape(*lead, n_out)
