"""Lookup tables (LUTs) for LUT-quantized weights.

A table holds the ``2**bits`` values that a ``bits``-bit code can stand for.
Quantization scales each group of weights by ``absmax(group) / absmax(table)``
and stores, per weight, the index of the nearest table entry.

Tables here are float64 numpy arrays of shape ``[2**bits]``; ``quantize`` casts
them to the activation dtype it stores.

* :func:`nf`  normal float: quantiles of N(0, 1); for 4 bits exactly QLoRA's /
  bitsandbytes' NF4 values, so NF4 checkpoints convert without loss.
* ``int``     uniform integers ``-2**(bits-1) .. 2**(bits-1)-1`` (``tables.int(4)``;
  the name is served by the module ``__getattr__`` so it never shadows the builtin
  inside this module; :func:`uniform` is the same function).
* :func:`fp`  minifloats: for 4 bits e2m1 (the OCP FP4 values), 3 bits e2m0,
  2 bits e1m0; both signs of zero are kept, as the formats define them.
* :func:`resolve` turns a name or a user array into a validated table.
"""

from __future__ import annotations

import statistics
from typing import Union

import numpy as np

SUPPORTED_BITS = (2, 3, 4)

# QLoRA / bitsandbytes NF4 values (float32 literals as bitsandbytes ships them).
_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
).astype(np.float64)

# QLoRA's offset: the outermost quantile used for 4 bits, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2.
_NF_OFFSET = 0.9677083


def check_bits(bits: int) -> int:
    """Validate a code width; returns it as a Python int."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits.__int__()


def normal_float(bits: int) -> np.ndarray:
    """QLoRA's normal-float construction for any width (no special case for 4 bits).

    ``2**(bits-1)`` positive quantiles, ``2**(bits-1) - 1`` negative ones and an exact
    zero, normalised to [-1, 1]. For 4 bits this reproduces NF4 to float32 rounding.
    """
    check_bits(bits)
    half = 2 ** (bits - 1)
    ppf = statistics.NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(_NF_OFFSET, 0.5, half + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(_NF_OFFSET, 0.5, half)[:-1]]
    values = np.sort(np.array(pos + [0.0] + neg, dtype=np.float64))
    return values / np.abs(values).max()


def nf(bits: int) -> np.ndarray:
    """Normal-float table, ``[2**bits]`` float64, sorted, in [-1, 1]."""
    check_bits(bits)
    if bits == 4:
        return _NF4.copy()
    return normal_float(bits)


def uniform(bits: int) -> np.ndarray:
    """Uniform integer table ``-2**(bits-1) .. 2**(bits-1) - 1``, ``[2**bits]`` float64."""
    check_bits(bits)
    return np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.float64)


_FP_FORMATS = {4: (2, 1), 3: (2, 0), 2: (1, 0)}  # bits -> (exponent bits, mantissa bits)


def fp(bits: int) -> np.ndarray:
    """Minifloat table (sign, exponent, mantissa; bias 2**(e-1) - 1, with subnormals).

    Entry ``i`` is the value of bit pattern ``i`` (sign in the top bit): for 4 bits the
    e2m1 values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
    """
    check_bits(bits)
    exp_bits, man_bits = _FP_FORMATS[bits]
    bias = 2 ** (exp_bits - 1) - 1
    values = []
    for pattern in range(2**bits):
        sign = -1.0 if pattern >> (bits - 1) else 1.0
        exponent = (pattern >> man_bits) & ((1 << exp_bits) - 1)
        mantissa = pattern & ((1 << man_bits) - 1)
        if exponent == 0:  # subnormal
            magnitude = (mantissa / 2**man_bits) * 2.0 ** (1 - bias)
        else:
            magnitude = (1 + mantissa / 2**man_bits) * 2.0 ** (exponent - bias)
        values.append(sign * magnitude)
    return np.array(values, dtype=np.float64)


_NAMED = {"nf": nf, "int": uniform, "uniform": uniform, "fp": fp}
TableLike = Union[str, np.ndarray, "object"]


def resolve(table: TableLike, bits: int) -> np.ndarray:
    """A table name (``"nf"``, ``"int"``, ``"fp"``) or array-like -> ``[2**bits]`` float64.

    Raises ValueError for an unknown name, a wrong length, non-finite values or an
    all-zero table (which cannot represent any non-zero weight).
    """
    check_bits(bits)
    if isinstance(table, str):
        if table not in _NAMED:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(_NAMED)} or an array")
        return _NAMED[table](bits)
    values = np.asarray(table, dtype=np.float64)
    if values.shape != (2**bits,):
        raise ValueError(f"a {bits}-bit table needs shape ({2**bits},), got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("table values must be finite")
    if not np.any(values != 0):
        raise ValueError("table must have a non-zero entry")
    return values


def __getattr__(name: str):
    # `tables.int(bits)` as the issue spells it, without shadowing the builtin here.
    if name == "int":
        return uniform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + ["int"])
