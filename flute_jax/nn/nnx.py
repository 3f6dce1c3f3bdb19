"""``FluteLinear``: a drop-in for ``flax.nnx.Linear`` with a LUT-quantized kernel, and
``quantize_model``, which swaps a model's ``nnx.Linear`` layers for it in place.

An nnx Variable carries one sharding annotation, but a QuantizedWeight has three arrays of
different ranks, so FluteLinear keeps them as three ``nnx.Param``s (``codes``, ``scales``,
``table``), each with its own axis names derived from the kernel's (see
:mod:`flute_jax.nn._common`); ``bits``, ``group_size`` and the logical shape are static
attributes (they live in the graphdef, not in the state). ``layer.kernel`` reassembles the
:class:`flute_jax.QuantizedWeight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ..ops import qgemm
from ..quantize import QuantizedWeight
from . import _common

# nnx has spelled the sharding metadata key several ways across versions.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")
default_kernel_init = nnx.initializers.lecun_normal()


def _leaf_metadata(kernel_metadata: Mapping, group_size: int) -> dict[str, dict]:
    """Per-leaf Param metadata: the kernel's, with its axis names mapped to each leaf."""
    base = dict(kernel_metadata)
    key = next((k for k in _SHARDING_KEYS if base.get(k)), None)
    if key is None:
        return {name: dict(base) for name in ("codes", "scales", "table")}
    axes = _common.leaf_axes(tuple(base[key]), group_size)
    return {name: {**base, key: axes[name]} for name in axes}


class FluteLinear(nnx.Module):
    """``y = x @ W_hat + b`` with a LUT-quantized ``W_hat [in_features, out_features]``.

    Arguments as ``nnx.Linear`` (``in_features``, ``out_features``, ``use_bias``, ``dtype``,
    ``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``, ``rngs``,
    ``kernel_metadata``, ``bias_metadata``), plus ``bits``, ``group_size``, ``table`` and
    ``epilogue`` (``None`` or ``"swiglu"``, as :class:`flute_jax.nn.FluteDense`: the output is
    then ``[..., out_features // 2]``, and there is no bias).
    ``kernel_init`` draws the dense kernel in ``param_dtype`` and it is quantized at once.
    ``precision`` is accepted for drop-in compatibility; the kernel multiplies exactly with
    float32 accumulation, so it has no effect.

    ``weight`` / ``bias``: build the layer from an existing QuantizedWeight (and bias array)
    instead of initializing; ``rngs`` is then not needed. Params: ``codes``, ``scales``,
    ``table`` (the QuantizedWeight's leaves) and ``bias [out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Optional[Any] = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., Any] = default_kernel_init,
        bias_init: Callable[..., Any] = nnx.initializers.zeros_init(),
        bits: int = 4,
        group_size: int = 64,
        table: Any = "nf",
        rngs: Optional[nnx.Rngs] = None,
        weight: Optional[QuantizedWeight] = None,
        bias: Optional[jax.Array] = None,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        epilogue: Optional[str] = None,
    ):
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluteLinear.{what} must be a positive int, got {value!r}")
        if epilogue is not None and use_bias:
            raise ValueError("FluteLinear with an epilogue has no bias: the epilogue runs on x @ W, set use_bias=False")
        if weight is None:
            if rngs is None:
                raise TypeError("FluteLinear needs rngs= to initialize (or weight= to wrap an existing one)")
            dense = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
            weight = _common.quantize_kernel(dense, bits, group_size, table, param_dtype)
        _common.check_weight(weight, in_features, out_features, bits, group_size, "FluteLinear")
        metadata = _leaf_metadata(kernel_metadata, weight.group_size)
        self.codes = nnx.Param(weight.codes, **metadata["codes"])
        self.scales = nnx.Param(weight.scales, **metadata["scales"])
        self.table = nnx.Param(weight.table, **metadata["table"])
        if use_bias:
            if bias is None:
                if rngs is None:
                    raise TypeError("FluteLinear needs rngs= to initialize its bias (or bias=)")
                bias = bias_init(rngs.params(), (out_features,), param_dtype)
            self.bias = nnx.Param(bias, **dict(bias_metadata))
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.epilogue = epilogue

    @property
    def kernel(self) -> QuantizedWeight:
        """The layer's weight as a :class:`flute_jax.QuantizedWeight`."""
        return QuantizedWeight(
            codes=self.codes[...],
            scales=self.scales[...],
            table=self.table[...],
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.in_features, self.out_features),
        )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs [..., in_features] -> [..., out_features]`` (``// 2`` with ``epilogue="swiglu"``)."""
        inputs = jnp.asarray(inputs)
        qw = self.kernel
        bias = self.bias[...] if self.bias is not None else None
        dtype = _common.compute_dtype(self.dtype, inputs, qw.scales, bias)
        y = qgemm(inputs.astype(dtype), qw, epilogue=self.epilogue)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        return y

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        *,
        bits: int = 4,
        group_size: int = 64,
        table: Any = "nf",
        dtype: Any = None,
    ) -> "FluteLinear":
        """Quantize a trained ``nnx.Linear`` (kernel ``[K, N]``, or ``[*L, K, N]`` stacked by
        ``nnx.vmap``). ``dtype``: dtype of scales and table, default the kernel's. The kernel's
        Param metadata (sharding names) carries over to the leaves."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear needs an nnx.Linear, got {type(linear).__name__}")
        kernel = linear.kernel[...]
        weight = _common.quantize_kernel(kernel, bits, group_size, table, dtype or kernel.dtype)
        bias_param = linear.bias
        return cls(
            linear.in_features,
            linear.out_features,
            use_bias=linear.use_bias,
            dtype=linear.dtype,
            param_dtype=weight.dtype,
            precision=linear.precision,
            bits=bits,
            group_size=group_size,
            weight=weight,
            bias=bias_param[...] if bias_param is not None else None,
            kernel_metadata=_param_metadata(linear.kernel),
            bias_metadata=_param_metadata(bias_param) if bias_param is not None else {},
        )


def _param_metadata(param: nnx.Variable) -> dict:
    metadata = dict(param.get_metadata())
    # Bookkeeping entries nnx adds itself; passing them back to a constructor is an error.
    for key in ("value", "raw_value", "type"):
        metadata.pop(key, None)
    return metadata


Where = _common.Where


def _set_child(parent: Any, key: Any, value: Any) -> None:
    # Attributes are named by strings; list items (also nnx.List) by ints, dict items by keys.
    if isinstance(key, str) and not isinstance(parent, Mapping):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _child(parent: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(parent, key) and not isinstance(parent, Mapping):
        return getattr(parent, key)
    return parent[key]


def quantize_model(
    model: nnx.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype: Any = None,
    where: Where = None,
) -> list[tuple]:
    """Replace the ``nnx.Linear`` layers of ``model`` by :class:`FluteLinear`, in place.

    Args:
      model: any nnx Module (layers may sit in attributes, lists or dicts).
      bits, group_size, table, dtype: as :meth:`FluteLinear.from_linear`.
      where: None (all Linear layers), a regex searched in the layer's path joined by "/",
        or a callable ``(path, layer) -> bool``.
    Returns:
      The paths of the replaced layers.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"quantize_model needs an nnx.Module, got {type(model).__name__}")
    select = _common.layer_selector(where)
    targets = [
        (tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear) and len(path) > 0 and select(tuple(path), node)
    ]
    for path, layer in targets:
        parent = model
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], FluteLinear.from_linear(layer, bits=bits, group_size=group_size, table=table, dtype=dtype))
    return [path for path, _ in targets]
