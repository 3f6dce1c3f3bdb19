"""The ``dense`` GPU path of ``qgemm`` (large M): dequantize the weight once, then XLA's dot.

On CUDA the dequantization is our kernel (``csrc/dequant_kernel.cu``, FFI target
``flute_dequantize``): it reads the packed codes once and writes ``W_hat [K, N]``
row-major in x's dtype near the copy bandwidth, where the equivalent XLA fusion of
:func:`flute_jax.autodiff.dequantized` runs at about a fifth of it (H100). Both give
the same bits: ``float32(table[code]) * float32(scale)``, rounded once to x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import autodiff
from . import epilogue as epilogues

DEQUANT_TARGET = "flute_dequantize"


def dequantize_cuda(codes: jax.Array, scales: jax.Array, table: jax.Array, *, bits: int, group_size: int,
                    k: int) -> jax.Array:
    """``W_hat [K, N]`` in ``scales.dtype`` (float16, bfloat16 or float32) from the CUDA kernel.

    codes ``uint32[ceil(K/256), ceil(N/16), 128*bits]`` (packed layout), scales ``[G, N]``,
    table ``[2**bits]`` in one dtype; ``group_size``: K rows per scale group (resolved,
    K itself for one group). CUDA only: lower it inside a CUDA lowering.
    """
    n = scales.shape[1]
    call = jax.ffi.ffi_call(DEQUANT_TARGET, jax.ShapeDtypeStruct((k, n), scales.dtype))
    return call(codes, scales, table.astype(scales.dtype), bits=np.int64(bits), group_size=np.int64(group_size))


def dense_qgemm(x: jax.Array, codes: jax.Array, scales: jax.Array, table: jax.Array, *, bits: int,
                group_size: int, cuda: bool, epilogue: str = "none") -> jax.Array:
    """``x [M, K] @ W_hat`` -> ``[M, N]`` in x's dtype: one dequantization to x's dtype, then
    XLA's dot with float32 accumulation (the same weight and precision as the transpose
    rule for x). ``cuda``: dequantize with the CUDA kernel and let cuBLAS round its float32
    accumulators to x's dtype; else dequantize with jax.numpy and dot into float32.
    ``epilogue`` (:mod:`flute_jax.epilogue`) applies to the float32 dot, as in the kernels:
    ``"swiglu"`` gives ``[M, N/2]``."""
    k = x.shape[1]
    if cuda:
        w = dequantize_cuda(codes, scales.astype(x.dtype), table.astype(x.dtype), bits=bits, group_size=group_size, k=k)
        # cuBLAS accumulates 16-bit dots in float32 and rounds once in its epilogue; a
        # float32 result plus a convert would write and re-read [M, N] float32 (at
        # M = 4096, N = 57344: ~0.5 ms on an H100).
        out_dtype = x.dtype if epilogue == "none" else jnp.float32
    else:
        w = autodiff.dequantized(codes, scales, table, bits=bits, group_size=group_size, k=k).astype(x.dtype)
        out_dtype = jnp.float32  # CPU dots of 16-bit types: ask for float32 accumulation explicitly
    y = jnp.dot(x, w, precision=autodiff.dot_precision(x.dtype), preferred_element_type=out_dtype)
    return epilogues.apply(y, epilogue).astype(x.dtype)
