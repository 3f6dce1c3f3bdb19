"""flute_jax: FLUTE lookup-table-quantized matrix multiplication for JAX.

    qw = flute_jax.quantize(w, bits=4, group_size=64, table="nf")   # w: [K, N]
    y = flute_jax.qgemm(x, qw)                                      # [..., K] -> [..., N]
    w_hat = flute_jax.dequantize(qw)                                # [K, N]
"""

from . import tables
from .layout import pack, unpack
from .ops import qgemm
from .quantize import QuantizedWeight, dequantize, quantize

__all__ = ["QuantizedWeight", "dequantize", "pack", "qgemm", "quantize", "tables", "unpack"]
__version__ = "0.1.0"
