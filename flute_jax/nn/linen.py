"""``FluteDense``: a drop-in for ``flax.linen.Dense`` whose kernel is LUT-quantized.

    layer = FluteDense(features=4096, bits=4, group_size=64, table="nf",
                       kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))
    variables = layer.init(key, x)          # x [..., K]; kernel_init draws [K, N], init quantizes it
    y = layer.apply(variables, x)           # [..., N]

Params: ``kernel`` is a :class:`flute_jax.QuantizedWeight` (codes already in the kernel's
packed layout, scales, table) and ``bias`` is ``[N]``, as for Dense. If ``kernel_init`` returns
a partitioning box (``nn.with_logical_partitioning`` / ``nn.with_partitioning``), or
``kernel_axes`` is set, each leaf of the QuantizedWeight is boxed with its own axis names
(see :mod:`flute_jax.nn._common`), so ``nn.get_partition_spec`` gives one PartitionSpec per
leaf and jit/pjit shardings work leaf by leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from ..ops import qgemm
from ..quantize import QuantizedWeight
from . import _common

Dtype = Any
default_kernel_init = initializers.lecun_normal()


def box_weight(qw: QuantizedWeight, box: Any, kernel_axes: Sequence[Optional[str]]) -> QuantizedWeight:
    """Wrap each leaf of ``qw`` in a copy of the partitioning ``box`` with that leaf's names.

    ``box`` is the ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` the dense kernel came in
    (its mesh and rules are kept); ``kernel_axes`` the kernel's axis names.
    """
    axes = _common.leaf_axes(kernel_axes, qw.group_size)
    return dataclasses.replace(
        qw,
        **{name: box.replace(value=getattr(qw, name), names=axes[name]) for name in axes},
    )


class FluteDense(nn.Module):
    """A linear transformation ``y = x @ W_hat + b`` with a LUT-quantized ``W_hat [K, N]``.

    Fields as in ``flax.linen.Dense``:
      features: N, the number of output features.
      use_bias: add a bias ``[N]``.
      dtype: computation dtype (default: promotion of the input and the params, as Dense).
        Must resolve to float16, bfloat16 or float32, the kernel's activation dtypes.
      param_dtype: dtype of the bias and of the quantized weight's scales and table
        (float16, bfloat16 or float32); kernel_init draws the dense kernel in it.
      precision: accepted for drop-in compatibility; the kernel always multiplies exactly
        and accumulates in float32 (what ``Precision.HIGHEST`` asks of a dense dot), so it
        has no effect.
      kernel_init: initializer of the dense ``[K, N]`` kernel that init quantizes. May be
        wrapped in ``nn.with_logical_partitioning`` / ``nn.with_partitioning``.
      bias_init: initializer of the bias.
    Quantization:
      bits: 2, 3 or 4.  group_size: 32, 64, 128, 256 or -1 (one group over all of K).
      table: ``"nf"``, ``"int"``, ``"fp"`` or an array of ``2**bits`` values.
      kernel_axes: optional logical names ``(k_axis, n_axis)`` of the kernel, for when
        kernel_init carries no partitioning box.
    Fused output:
      epilogue: ``None``, or ``"swiglu"``: the layer is a Llama MLP's gate/up projection whose
        kernel ``[K, features]`` holds gate and up columns in blocks of 8
        (:func:`flute_jax.epilogue.interleave_gate_up`), and it returns
        ``silu(x @ gate) * (x @ up)``, ``[..., features // 2]``, from one kernel. No bias.
    """

    features: int
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., Any] = default_kernel_init
    bias_init: Callable[..., Any] = initializers.zeros_init()
    bits: int = 4
    group_size: int = 64
    table: Any = "nf"
    kernel_axes: Optional[tuple] = None
    epilogue: Optional[str] = None

    def _init_kernel(self, rng: jax.Array, shape: tuple[int, int]) -> QuantizedWeight:
        dense = self.kernel_init(rng, shape, self.param_dtype)
        if isinstance(dense, nn.Partitioned):  # LogicallyPartitioned is a subclass
            qw = _common.quantize_kernel(dense.value, self.bits, self.group_size, self.table, self.param_dtype)
            return box_weight(qw, dense, dense.names)
        qw = _common.quantize_kernel(dense, self.bits, self.group_size, self.table, self.param_dtype)
        if self.kernel_axes is not None:
            return box_weight(qw, nn.LogicallyPartitioned(None, ()), self.kernel_axes)
        return qw

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs [..., K] -> [..., features]`` (``[..., features // 2]`` with ``epilogue="swiglu"``)."""
        if isinstance(self.features, bool) or not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"FluteDense.features must be a positive int, got {self.features!r}")
        if self.epilogue is not None and self.use_bias:
            raise ValueError("FluteDense with an epilogue has no bias: the epilogue runs on x @ W, set use_bias=False")
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1:
            raise ValueError("FluteDense inputs must have at least one axis [..., K]")
        k = inputs.shape[-1]
        if self.has_variable("params", "kernel"):
            # Read it directly: self.param would compare it against the initializer's shapes
            # first and fail with a less helpful message for a dense or mismatched kernel.
            qw = nn.meta.unbox(self.get_variable("params", "kernel"))
        else:
            qw = self.param("kernel", self._init_kernel, (k, self.features))
        _common.check_weight(qw, k, self.features, self.bits, self.group_size, f"FluteDense {self.name}")
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        dtype = _common.compute_dtype(self.dtype, inputs, qw.scales, bias)
        y = qgemm(inputs.astype(dtype), qw, epilogue=self.epilogue)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        return y
