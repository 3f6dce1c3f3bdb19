"""Float weights <-> LUT-quantized ``QuantizedWeight``.

``W_hat[k, n] = table[codes[k, n]] * scales[k // group_size, n]`` with W in Flax's
``[K, N]`` (in features, out features) layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import layout, tables

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
ACTIVATION_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
        group_size not in SUPPORTED_GROUP_SIZES
    ):
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    return group_size.__int__()


def check_activation_dtype(dtype, what: str = "dtype") -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in ACTIVATION_DTYPES]:
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {dtype}")
    return dtype


def num_groups(k: int, group_size: int) -> int:
    """Rows of the scales array: ``ceil(K / group_size)`` (1 for ``group_size = -1``)."""
    return 1 if group_size == -1 else -(-k // group_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A LUT-quantized ``[K, N]`` weight in the kernel's packed layout.

    Array leaves:
      codes:  ``uint32[ceil(K/256), ceil(N/16), 128*bits]``, see :mod:`flute_jax.layout`.
      scales: ``[ceil(K/group_size), N]`` in the activation dtype (one row for group_size -1).
      table:  ``[2**bits]`` in the activation dtype.
    Static metadata: ``bits``, ``group_size`` (-1: one group over all of K), ``shape = (K, N)``.
    """

    codes: jax.Array
    scales: jax.Array
    table: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self) -> jnp.dtype:
        return self.scales.dtype

    @property
    def group_rows(self) -> int:
        """Rows of K per scale group (K itself for group_size -1)."""
        return self.shape[0] if self.group_size == -1 else self.group_size

    def validate(self) -> "QuantizedWeight":
        """Check that the arrays agree with the metadata; raises ValueError/TypeError."""
        tables.check_bits(self.bits)
        check_group_size(self.group_size)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"QuantizedWeight.shape must be (K, N) with K, N >= 1, got {self.shape}")
        k, n = self.shape
        expected = layout.packed_shape(k, n, self.bits)
        if tuple(self.codes.shape) != expected or self.codes.dtype != jnp.uint32:
            raise ValueError(
                f"QuantizedWeight codes must be uint32{list(expected)} for shape {self.shape} at "
                f"{self.bits} bits, got {self.codes.dtype}{list(self.codes.shape)}"
            )
        g = num_groups(k, self.group_size)
        if tuple(self.scales.shape) != (g, n):
            raise ValueError(
                f"QuantizedWeight scales must have shape {(g, n)} for shape {self.shape} and "
                f"group_size {self.group_size}, got {tuple(self.scales.shape)}"
            )
        if tuple(self.table.shape) != (2**self.bits,):
            raise ValueError(
                f"a {self.bits}-bit table must have shape ({2**self.bits},), got {tuple(self.table.shape)}"
            )
        check_activation_dtype(self.scales.dtype, "scales dtype")
        if self.table.dtype != self.scales.dtype:
            raise TypeError(f"table dtype {self.table.dtype} differs from scales dtype {self.scales.dtype}")
        return self


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def compute_codes_and_scales(w, table: np.ndarray, group_size: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Group absmax scaling and nearest-entry rounding (traceable).

    Returns ``codes uint8[K, N]`` and ``scales dtype[G, N]``. Codes are chosen against
    the scale as stored (rounded to ``dtype``) so they match what dequantizes.
    """
    k, n = w.shape
    rows = k if group_size == -1 else group_size
    g = num_groups(k, group_size)
    wf = jnp.asarray(w, jnp.float32)
    padded = jnp.pad(wf, ((0, g * rows - k), (0, 0))).reshape(g, rows, n)
    absmax = jnp.max(jnp.abs(padded), axis=1)  # [G, N]
    scales = (absmax / np.float32(np.abs(table).max())).astype(dtype)
    s = jnp.repeat(scales.astype(jnp.float32), rows, axis=0)[:k]
    normalized = jnp.where(s == 0, 0.0, wf / jnp.where(s == 0, 1.0, s))
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    midpoints = jnp.asarray((sorted_table[1:] + sorted_table[:-1]) / 2, jnp.float32)
    nearest = jnp.searchsorted(midpoints, normalized, side="left")
    codes = jnp.asarray(order.astype(np.uint8))[nearest]
    return codes, scales


def quantize(
    w,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype=jnp.bfloat16,
) -> QuantizedWeight:
    """Quantize a float weight ``w[K, N]`` (Flax kernel layout) to a :class:`QuantizedWeight`.

    Args:
      w: float array ``[K, N]``.
      bits: 2, 3 or 4.
      group_size: 32, 64, 128, 256, or -1 for one group over all of K. K need not be a multiple.
      table: ``"nf"``, ``"int"``, ``"fp"`` or an array of ``2**bits`` values.
      dtype: activation dtype in which scales and table are stored (float16, bfloat16, float32).

    Each group is scaled by its absmax over the table's absmax and each weight takes the
    nearest table entry. Traceable; with concrete inputs, non-finite weights or scales that
    overflow ``dtype`` raise ValueError.
    """
    bits = tables.check_bits(bits)
    group_size = check_group_size(group_size)
    dtype = check_activation_dtype(dtype)
    table_values = tables.resolve(table, bits)
    table_stored = table_values.astype(dtype).astype(np.float64)  # as the kernel will see it
    if not np.any(table_stored != 0) or not np.all(np.isfinite(table_stored)):
        raise ValueError(f"table is not representable in {dtype}")
    if not hasattr(w, "shape") or len(w.shape) != 2:
        raise ValueError(f"w must be a 2-D [K, N] array, got shape {getattr(w, 'shape', None)}")
    if min(w.shape) < 1:
        raise ValueError(f"w must have K, N >= 1, got shape {tuple(w.shape)}")
    if not jnp.issubdtype(jnp.asarray(w).dtype if _is_concrete(w) else w.dtype, jnp.floating):
        raise TypeError(f"w must be a float array, got {w.dtype}")
    codes, scales = compute_codes_and_scales(w, table_stored, group_size, dtype)
    if _is_concrete(scales) and not bool(jnp.all(jnp.isfinite(scales))):
        raise ValueError(
            "non-finite scales: w has NaN/Inf entries or group absmax overflows "
            f"{dtype} (max finite {float(jnp.finfo(dtype).max)})"
        )
    return weight_from_codes(codes, scales, table_stored.astype(dtype), bits, group_size)


def weight_from_codes(codes, scales, table, bits: int, group_size: int) -> QuantizedWeight:
    """Pack ``codes[K, N]`` and bundle them with ``scales`` and ``table`` (stored as given)."""
    return QuantizedWeight(
        codes=layout.pack(codes, bits),
        scales=scales,
        table=jnp.asarray(table),
        bits=bits,
        group_size=group_size,
        shape=tuple(codes.shape),
    )


def codes_of(qw: QuantizedWeight) -> jax.Array:
    """The ``uint8[K, N]`` codes of a QuantizedWeight."""
    return layout.unpack(qw.codes, qw.bits, qw.shape)


def dequantize(qw: QuantizedWeight, dtype: Optional[Any] = None) -> jax.Array:
    """``W_hat[K, N] = table[codes] * scales[k // group_size]``, in ``dtype`` (default: qw's dtype).

    The product is formed in float32 (exact for 16-bit tables and scales), then cast.
    """
    qw.validate()
    k, n = qw.shape
    values = qw.table.astype(jnp.float32)[codes_of(qw)]
    s = jnp.repeat(qw.scales.astype(jnp.float32), qw.group_rows, axis=0)[:k]
    return (values * s).astype(dtype or qw.dtype)
