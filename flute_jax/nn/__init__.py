"""Flax integration of flute_jax: layers, model conversion and checkpoints.

* linen: :class:`FluteDense` (drop-in for ``flax.linen.Dense``), :func:`quantize_params`.
* nnx:   :class:`FluteLinear` (drop-in for ``flax.nnx.Linear``), :func:`quantize_model`.
* checkpoints (orbax): :func:`save`, :func:`restore`, :func:`metadata`.

See docs/flax.md.
"""

from . import checkpoint
from .checkpoint import metadata as checkpoint_metadata
from .checkpoint import restore, save
from .convert import quantize_params, quantized_paths, tree_bytes
from .linen import FluteDense
from ._common import leaf_axes
from .nnx import FluteLinear, quantize_model

__all__ = [
    "FluteDense",
    "FluteLinear",
    "checkpoint",
    "checkpoint_metadata",
    "leaf_axes",
    "quantize_model",
    "quantize_params",
    "quantized_paths",
    "restore",
    "save",
    "tree_bytes",
]
