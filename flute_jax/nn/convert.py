"""``quantize_params``: turn a trained Dense param tree into FluteDense params.

A layer is any mapping in the tree with a ``kernel`` entry of rank >= 2 (Flax's Dense layout
``[K, N]``, or ``[*L, K, N]`` for layers stacked by ``nn.scan`` / ``nn.vmap``, whose leading
axes are layer axes). Its kernel becomes a :class:`flute_jax.QuantizedWeight`; every other
entry (bias, norms, embeddings) is kept as it is, so the result has exactly the structure
``FluteDense`` params have and a model that swaps ``nn.Dense`` for ``FluteDense`` under the
same names applies to it directly.

``DenseGeneral`` kernels of rank > 2 look like stacked kernels and would be misread: exclude
them with ``where``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict

from ..quantize import QuantizedWeight
from . import _common
from .linen import box_weight

Where = _common.Where


def _is_dense_kernel(value: Any) -> bool:
    array = value.value if isinstance(value, nn.Partitioned) else value
    return not isinstance(array, QuantizedWeight) and hasattr(array, "shape") and len(array.shape) >= 2


def quantize_params(
    params: Any,
    *,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype: Any = None,
    where: Where = None,
) -> Any:
    """Quantize the Dense kernels of a param tree.

    Args:
      params: a (nested) dict / FrozenDict of params, as ``model.init(...)["params"]`` or a
        restored checkpoint gives; partitioning boxes (``nn.LogicallyPartitioned``) are kept
        and each QuantizedWeight leaf gets its own axis names. Also accepts the full
        variables dict (``{"params": ...}``).
      bits, group_size, table: the quantization format (see :func:`flute_jax.quantize`).
      dtype: dtype of the scales and table (float16, bfloat16 or float32); default: the
        kernel's dtype. The FluteDense that applies the result should have this param_dtype.
      where: which layers to quantize. None: all. A string: a regex searched in the layer
        path joined by "/" (e.g. ``"mlp|attn"``; the path names the layer, not "kernel").
        A callable ``(path: tuple[str, ...], kernel) -> bool``.
    Returns:
      A tree of the same structure (same mapping types) with the selected kernels replaced.
    """
    select = _common.layer_selector(where)

    def convert_kernel(value: Any) -> Any:
        box = value if isinstance(value, nn.Partitioned) else None
        kernel = box.value if box is not None else value
        kdtype = dtype if dtype is not None else kernel.dtype
        qw = _common.quantize_kernel(kernel, bits, group_size, table, kdtype)
        return box_weight(qw, box, box.names) if box is not None else qw

    def visit(node: Any, path: tuple) -> Any:
        if isinstance(node, QuantizedWeight) or not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            if key == "kernel" and _is_dense_kernel(value):
                kernel = value.value if isinstance(value, nn.Partitioned) else value
                out[key] = convert_kernel(value) if select(path, kernel) else value
            else:
                out[key] = visit(value, path + (key,))
        return FrozenDict(out) if isinstance(node, FrozenDict) else type(node)(out) if isinstance(node, dict) else out

    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (dict / FrozenDict), got {type(params).__name__}")
    return visit(params, ())


def quantized_paths(params: Any) -> list[tuple]:
    """Paths (tuples of keys) of the QuantizedWeights in a param tree, for reports."""
    found = []

    def visit(node: Any, path: tuple) -> None:
        if isinstance(node, QuantizedWeight):
            found.append(path)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, path + (key,))

    visit(params, ())
    return found


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (boxes unboxed)."""
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in leaves if hasattr(leaf, "dtype"))
