"""The canonical packed layout of LUT codes: ``pack`` / ``unpack``.

One layout for every GPU and tile configuration. It is built so that a warp that
loads one *unit* with 16-byte loads holds, after the table lookup, the weights
already in the register order of the tensor-core A operand of
``mma.sync.m16n8k16`` (row-major A, here ``W^T``: rows are output features n,
columns are input features k). The same per-warp fragment order is the A-from-
registers operand of Hopper's ``wgmma``. No shuffles at run time.

Shapes
------
codes ``[K, N]`` uint8 (values ``< 2**bits``) pack into::

    packed: uint32[ceil(K / 256), ceil(N / 16), 128 * bits]

Axis 0 is the K-block (256 input features), axis 1 the N-block (16 output
features), axis 2 the unit's words. Padding codes are 0; the kernels never read
x beyond K and never write y beyond N, and treat the scales of padded rows as 0.
A slice of the packed array along axis 1 (whole N-blocks) or axis 0 (whole
K-blocks) is the packed array of that slice of the weight, so shardings need no
repacking.

Inside one unit (256 x 16 codes)
--------------------------------
The unit is 16 *tiles* of 16 (k) x 16 (n); tile ``t`` covers
``k in [16 t, 16 t + 16)``. Lane ``l = 4 r + q`` (``r = l // 4``, ``q = l % 4``)
of a warp owns, in every tile, four *pairs* of codes; pair ``p`` holds the codes
at ``(k, n)`` and ``(k + 1, n)`` with::

    n = r + 8 * (p & 1),   k = 16 t + 2 q + 8 * (p >> 1)

(the A fragment registers a0a1, a2a3, a4a5, a6a7 of m16n8k16, in that order).

A code of ``bits`` bits is split into *planes*: 4 bits -> one 4-bit plane;
3 bits -> a 2-bit plane (the low bits) then a 1-bit plane (the high bit);
2 bits -> one 2-bit plane. A plane of width ``w`` gives each lane a stream of
``16 tiles * 8 codes * w = 128 w`` bits, in the order (tile, pair, even/odd k)::

    bit position in the lane's stream:  s = 8 w * t + 2 w * p + w * (k & 1)

so one pair is ``2 w`` adjacent bits (even-k code low) and indexes a table of
pairs directly. The stream is cut into ``w`` pieces of 16 bytes; piece ``j`` of
all 32 lanes is stored contiguously (512 bytes, one coalesced warp load)::

    word index in the plane = 128 * j + 4 * l + i,   where s = 128 j + 32 i + b
    bit b of that uint32 word (little-endian words)

The unit's ``128 * bits`` words are the planes in the order above (4-bit plane;
or 2-bit plane then 1-bit plane; or 2-bit plane).

The 1-bit plane of 3-bit codes is the exception (layout version 2, :data:`LAYOUT_VERSION`):
its bits sit next to the 2-bit plane's so that the kernels merge a pair's 6-bit table index
cheaply. The 2-bit plane's word ``j = t // 2`` of a lane holds pair ``p`` of tile ``t`` in
nibble ``v = 4 * (t % 2) + p``; the pair's two high bits (even k low) sit in the lane's
1-bit plane word ``j // 2`` (word index ``4 * l + j // 2`` of the plane), byte ``v // 2``, at
bit ``4 + 2 * (v % 2)`` of the byte for even ``j`` and ``2 * (v % 2)`` for odd ``j``.
(Version 1 stored that plane in stream order like the others; :func:`upgrade_codes`
converts.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .tables import check_bits

BLOCK_K = 256  # input features per unit (16 tiles of k16)
BLOCK_N = 16  # output features per unit
TILES = BLOCK_K // 16
LANES = 32

# (shift, width) of each plane of a code, in storage order.
PLANES = {4: ((0, 4),), 3: ((0, 2), (2, 1)), 2: ((0, 2),)}

# Version 2: the 3-bit codes' 1-bit plane in the order of high_plane_position (version 1:
# stream order). Checkpoints record it (flute_jax.nn.checkpoint).
LAYOUT_VERSION = 2


def high_plane_position(s: int) -> int:
    """Bit position, in a lane's 128 bits of the 3-bit codes' 1-bit plane, of its stream bit ``s``.

    ``s = 8 t + 2 p + kodd`` (tile, pair, k parity) goes to word ``j // 2`` (``j = t // 2``),
    byte ``v // 2`` (``v = 4 (t % 2) + p``), bit ``(4 if j is even else 0) + 2 (v % 2) + kodd``.
    """
    t, p, kodd = s >> 3, (s >> 1) & 3, s & 1
    j, v = t >> 1, 4 * (t & 1) + p
    return 32 * (j >> 1) + 8 * (v >> 1) + (0 if j & 1 else 4) + 2 * (v & 1) + kodd


# _HIGH_PLANE_POSITION[s] = where stream bit s is stored; HIGH_PLANE_SOURCE, its inverse
# permutation: the stream bit stored at each position.
_HIGH_PLANE_POSITION = np.array([high_plane_position(s) for s in range(128)])
HIGH_PLANE_SOURCE = np.argsort(_HIGH_PLANE_POSITION)


def words_per_unit(bits: int) -> int:
    """uint32 words that one 256 x 16 unit of ``bits``-bit codes takes."""
    return 128 * check_bits(bits)


def packed_shape(k: int, n: int, bits: int) -> tuple[int, int, int]:
    """Shape of the packed array for a ``[k, n]`` code matrix."""
    return (-(-k // BLOCK_K), -(-n // BLOCK_N), words_per_unit(bits))


def _lane_major(codes: jnp.ndarray, kb: int, nb: int) -> jnp.ndarray:
    """[Kp, Np] -> [kb, nb, lane, 128] with each lane's codes in stream order."""
    # k = 256 kb + 16 t + 8 khalf + 2 q + kodd ; n = 16 nb + 8 nhalf + r
    c = codes.reshape(kb, TILES, 2, 4, 2, nb, 2, 8)
    # axes: 0 kb, 1 t, 2 khalf, 3 q, 4 kodd, 5 nb, 6 nhalf, 7 r
    # stream order per lane (r, q): t, pair p = nhalf + 2 khalf (khalf major), kodd
    c = c.transpose(0, 5, 7, 3, 1, 2, 6, 4)
    return c.reshape(kb, nb, LANES, TILES * 8)


def pack(codes, bits: int) -> jnp.ndarray:
    """Codes ``[K, N]`` (integers in ``[0, 2**bits)``) -> packed ``uint32`` array.

    Traceable (works under ``jax.jit``). Returns ``uint32[ceil(K/256), ceil(N/16), 128*bits]``.
    """
    check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    k, n = codes.shape
    kb, nb, _ = packed_shape(k, n, bits)
    c = jnp.pad(codes.astype(jnp.uint32), ((0, kb * BLOCK_K - k), (0, nb * BLOCK_N - n)))
    stream = _lane_major(c, kb, nb)  # [kb, nb, 32, 128]
    planes = []
    for shift, width in PLANES[bits]:
        per_word = 32 // width
        v = (stream >> shift) & ((1 << width) - 1)
        if bits == 3 and width == 1:
            v = v[..., HIGH_PLANE_SOURCE]  # version 2's order of the high plane
        v = v.reshape(kb, nb, LANES, 4 * width, per_word)
        shifts = (width * jnp.arange(per_word, dtype=jnp.uint32)).astype(jnp.uint32)
        words = jnp.sum(v << shifts, axis=-1, dtype=jnp.uint32)  # [kb, nb, 32, 4w]
        words = words.reshape(kb, nb, LANES, width, 4).transpose(0, 1, 3, 2, 4)
        planes.append(words.reshape(kb, nb, 128 * width))
    return jnp.concatenate(planes, axis=-1) if len(planes) > 1 else planes[0]


def unpack(packed, bits: int, shape: tuple[int, int]) -> jnp.ndarray:
    """Inverse of :func:`pack`: packed array -> codes ``uint8[K, N]`` (``shape = (K, N)``)."""
    check_bits(bits)
    packed = jnp.asarray(packed)
    k, n = shape
    expected = packed_shape(k, n, bits)
    if packed.shape != expected or packed.dtype != jnp.uint32:
        raise ValueError(
            f"packed codes for shape {tuple(shape)} at {bits} bits must be uint32{list(expected)}, "
            f"got {packed.dtype}{list(packed.shape)}"
        )
    kb, nb, _ = expected
    stream = jnp.zeros((kb, nb, LANES, TILES * 8), jnp.uint32)
    offset = 0
    for shift, width in PLANES[bits]:
        per_word = 32 // width
        words = packed[..., offset : offset + 128 * width]
        offset += 128 * width
        words = words.reshape(kb, nb, width, LANES, 4).transpose(0, 1, 3, 2, 4)
        words = words.reshape(kb, nb, LANES, 4 * width, 1)
        shifts = (width * jnp.arange(per_word, dtype=jnp.uint32)).astype(jnp.uint32)
        v = ((words >> shifts) & ((1 << width) - 1)).reshape(kb, nb, LANES, TILES * 8)
        if bits == 3 and width == 1:
            v = v[..., _HIGH_PLANE_POSITION]  # back to stream order
        stream = stream | (v << shift)
    c = stream.reshape(kb, nb, 8, 4, TILES, 2, 2, 2)  # kb, nb, r, q, t, khalf, nhalf, kodd
    c = c.transpose(0, 4, 5, 3, 7, 1, 6, 2)  # kb, t, khalf, q, kodd, nb, nhalf, r
    c = c.reshape(kb * BLOCK_K, nb * BLOCK_N)
    return c[:k, :n].astype(jnp.uint8)


def upgrade_codes(packed, bits: int, version: int) -> jnp.ndarray:
    """Packed codes of layout ``version`` -> the current layout (:data:`LAYOUT_VERSION`).

    Version 1 differs only in the 3-bit codes' 1-bit plane, so only those change. Works on
    any leading axes (stacked layers) and keeps each array's sharding: the bits move within
    a unit's last-axis words only. Returns ``packed`` itself where nothing changes.
    """
    check_bits(bits)
    if version == LAYOUT_VERSION or bits != 3:
        return packed
    if version != 1:
        raise ValueError(f"unknown code layout version {version} (this flute_jax writes {LAYOUT_VERSION})")
    packed = jnp.asarray(packed)
    low, high = packed[..., :256], packed[..., 256:]
    lead = high.shape[:-1]
    shifts = jnp.arange(32, dtype=jnp.uint32)
    # version 1: bit s = 32 i + b of lane l's stream at word 4 l + i, bit b
    stream = ((high.reshape(*lead, LANES, 4, 1) >> shifts) & 1).reshape(*lead, LANES, 128)
    moved = stream[..., HIGH_PLANE_SOURCE].reshape(*lead, LANES, 4, 32)
    words = jnp.sum(moved << shifts, axis=-1, dtype=jnp.uint32).reshape(*lead, 128)
    return jnp.concatenate([low, words], axis=-1)
