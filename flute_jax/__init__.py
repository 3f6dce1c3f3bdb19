"""flute_jax: FLUTE lookup-table-quantized matrix multiplication for JAX.

    qw = flute_jax.quantize(w, bits=4, group_size=64, table="nf")   # w: [K, N]
    y = flute_jax.qgemm(x, qw)                                      # [..., K] -> [..., N]
    h = flute_jax.qgemm(x, qw_gate_up, epilogue="swiglu")          # silu(gate) * up: [..., N/2]
    w_hat = flute_jax.dequantize(qw)                                # [K, N]
"""

from . import convert, dispatch, epilogue, tables
from .layout import pack, unpack
from .ops import qgemm
from .quantize import QuantizedWeight, dequantize, quantize
from .calibrate import calibrate  # the function; flute_jax.calibrate's helpers: from flute_jax.calibrate import ...
from .export import export_disabled_checks
from .sharding import shard_specs

__all__ = [
    "QuantizedWeight",
    "calibrate",
    "convert",
    "dequantize",
    "epilogue",
    "export_disabled_checks",
    "pack",
    "qgemm",
    "quantize",
    "shard_specs",
    "tables",
    "unpack",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``flute_jax.nn`` on first access: the Flax layers import flax, which a bare
    ``import flute_jax`` should not pay for (or need installed)."""
    if name == "nn":
        import importlib

        return importlib.import_module(f"{__name__}.nn")  # also binds flute_jax.nn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
