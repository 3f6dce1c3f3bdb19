"""Quantize a matrix, multiply with it, compare with the dense product.

    python examples/quickstart.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import flute_jax


def main(argv=None) -> dict:
    k, n, m = 1000, 760, 4  # any K and N: padding is internal
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    results = {}
    for bits, group_size, table in [(4, 64, "nf"), (4, 128, "int"), (3, 64, "nf"), (2, 64, "nf")]:
        qw = flute_jax.quantize(w, bits=bits, group_size=group_size, table=table, dtype=jnp.bfloat16)
        y = jax.jit(flute_jax.qgemm)(x, qw)  # [m, n] bfloat16
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        exact = x64 @ np.asarray(flute_jax.dequantize(qw, jnp.float32), np.float64)  # same weights, float64
        dense = x64 @ np.asarray(w, np.float64)  # the unquantized weights
        err = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))  # noqa: E731
        kernel_err, quant_err = err(y.astype(jnp.float32), exact), err(exact, dense)
        nbytes = sum(a.size * a.dtype.itemsize for a in (qw.codes, qw.scales, qw.table))
        print(f"{bits}-bit {table:3s} g{group_size:<4d} {nbytes / 1024:7.1f} KiB (bf16: {k * n * 2 / 1024:.0f} KiB)  "
              f"kernel vs float64 {kernel_err:.1e}  quantized vs dense weights {quant_err:.3f}")
        results[(bits, group_size, table)] = {"kernel_error": kernel_err, "quantization_error": quant_err, "bytes": nbytes}
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
