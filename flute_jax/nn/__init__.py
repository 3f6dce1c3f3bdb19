"""Flax integration of flute_jax: layers, model conversion and checkpoints.

* linen: :class:`FluteDense` (drop-in for ``flax.linen.Dense``), :func:`quantize_params`.
* nnx:   :class:`FluteLinear` (drop-in for ``flax.nnx.Linear``), :func:`quantize_model`.
* checkpoints (orbax): :func:`save`, :func:`restore`, :func:`metadata`.

See docs/flax.md.
"""

from .convert import quantize_params, quantized_paths, tree_bytes
from .linen import FluteDense
from ._common import leaf_axes

__all__ = ["FluteDense", "leaf_axes", "quantize_params", "quantized_paths", "tree_bytes"]
