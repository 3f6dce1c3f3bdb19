"""Helpers shared by the linen and nnx layers: axis names of the packed leaves and
quantization of (possibly stacked) kernels.

A Dense kernel is ``[K, N]`` (in features, out features), or ``[*L, K, N]`` when layers are
stacked by ``nn.scan`` / ``nn.vmap`` / ``nnx.vmap`` (the leading axes are layer axes). Its
:class:`~flute_jax.QuantizedWeight` has leaves

    codes  uint32[*L, ceil(K/256), ceil(N/16), 128*bits]   -> axes (*L, k, n, None)
    scales [*L, ceil(K/group_size), N]                      -> axes (*L, k, n)
    table  [*L, 2**bits]                                    -> axes (*L, None)

Slicing codes along their K-block / N-block axes gives valid packed weights (see
:mod:`flute_jax.layout`), so the kernel's K axis name goes on both the code blocks and the
scale groups, and its N axis name on the code blocks and scale columns. With one group over
all of K (``group_size=-1``) the single scale row cannot be split, so it stays replicated.
The table is tiny and every shard needs all of it: replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ..quantize import QuantizedWeight, check_activation_dtype, quantize

AxisName = Optional[str]


def leaf_axes(
    kernel_axes: Sequence[AxisName], group_size: int
) -> dict[str, tuple[AxisName, ...]]:
    """Logical axis names of each QuantizedWeight leaf for a kernel with ``kernel_axes``.

    Args:
      kernel_axes: names of the kernel's axes, ``(*layer_axes, k_axis, n_axis)``.
      group_size: the weight's group size (-1 keeps the scales' K axis replicated).
    Returns:
      ``{"codes": (...), "scales": (...), "table": (...)}``.
    """
    kernel_axes = tuple(kernel_axes)
    if len(kernel_axes) < 2:
        raise ValueError(f"kernel axes must name at least (k_axis, n_axis), got {kernel_axes}")
    *lead, k_axis, n_axis = kernel_axes
    lead = tuple(lead)
    return {
        "codes": (*lead, k_axis, n_axis, None),
        "scales": (*lead, None if group_size == -1 else k_axis, n_axis),
        "table": (*lead, None),
    }


def quantize_kernel(
    kernel: jax.Array, bits: int, group_size: int, table: Any, dtype: Any
) -> QuantizedWeight:
    """Quantize ``kernel [*L, K, N]``; leading axes are layer axes, quantized independently.

    The result has static ``shape=(K, N)`` and leaves with the leading axes ``L`` in front,
    the form ``nn.scan`` gives a stacked FluteDense's params.
    """
    if not hasattr(kernel, "shape") or len(kernel.shape) < 2:
        raise ValueError(f"a kernel must be [..., K, N], got shape {getattr(kernel, 'shape', None)}")
    dtype = check_activation_dtype(dtype, "quantized weight dtype")
    if len(kernel.shape) == 2:
        return quantize(kernel, bits=bits, group_size=group_size, table=table, dtype=dtype)
    lead, (k, n) = tuple(kernel.shape[:-2]), tuple(kernel.shape[-2:])
    if math.prod(lead) == 0:
        raise ValueError(f"stacked kernel has an empty layer axis: shape {tuple(kernel.shape)}")
    flat = jnp.reshape(kernel, (-1, k, n))
    # One compiled program quantizes every layer; the per-layer checks that need concrete
    # values (finite scales) run once on the result below.
    stacked = jax.jit(
        jax.vmap(lambda w: quantize(w, bits=bits, group_size=group_size, table=table, dtype=dtype))
    )(flat)
    if not isinstance(stacked.scales, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(stacked.scales))):
        raise ValueError("non-finite scales: the kernel has NaN/Inf entries or overflows " f"{dtype}")
    return jax.tree.map(lambda leaf: jnp.reshape(leaf, lead + leaf.shape[1:]), stacked)


def check_weight(qw: Any, k: int, n: int, bits: int, group_size: int, where: str) -> QuantizedWeight:
    """Check that a stored kernel is the QuantizedWeight this layer expects (trace time)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(
            f"{where}: the 'kernel' param must be a flute_jax.QuantizedWeight, got "
            f"{type(qw).__name__} (convert dense params with flute_jax.nn.quantize_params)"
        )
    if tuple(qw.shape) != (k, n):
        raise ValueError(f"{where}: kernel has shape {qw.shape}, the layer needs {(k, n)}")
    if qw.bits != bits or qw.group_size != group_size:
        raise ValueError(
            f"{where}: kernel was quantized with bits={qw.bits}, group_size={qw.group_size}; "
            f"the layer is configured with bits={bits}, group_size={group_size}"
        )
    return qw


def compute_dtype(dtype: Any, *arrays: Any) -> jnp.dtype:
    """The layer's computation dtype: ``dtype`` if given, else the promotion of the inputs
    and params (what ``flax.linen.Dense`` does)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*[a for a in arrays if a is not None])


# Which layers a converter touches: None (all), a regex searched in the "/"-joined
# path, or a callable(path, layer) -> bool.
Where = Union[None, str, Callable[[tuple, Any], bool]]


def layer_selector(where: Where) -> Callable[[tuple, Any], bool]:
    """``where`` as a predicate ``(path, layer) -> bool``."""
    if where is None:
        return lambda path, layer: True
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda path, layer: pattern.search("/".join(map(str, path))) is not None
    if callable(where):
        return where
    raise TypeError(f"where must be None, a regex string or a callable(path, layer), got {type(where).__name__}")
