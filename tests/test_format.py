"""Tables, pack/unpack and quantize/dequantize against direct numpy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from flute_jax import layout, tables

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_is_bitsandbytes_nf4():
    assert np.array_equal(tables.nf(4).astype(np.float32), np.asarray(BNB_NF4, np.float32))
    # The general construction reproduces it too (no special case hides a wrong formula).
    assert np.allclose(tables.normal_float(4), BNB_NF4, atol=2e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_named_tables(bits):
    nf = tables.nf(bits)
    assert nf.shape == (2**bits,) and nf.min() == -1 and nf.max() == 1 and 0.0 in nf
    assert np.all(np.diff(nf) > 0)
    assert np.array_equal(tables.int(bits), np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert tables.fp(bits).shape == (2**bits,)
    assert tables.int is tables.uniform


def test_fp4_is_e2m1():
    assert sorted(set(np.abs(tables.fp(4)))) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert list(tables.fp(4)[:8]) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def naive_pack_word_bits(codes, bits, version=layout.LAYOUT_VERSION):
    """Direct per-code placement from the layout docstring's formulas (independent of pack).

    ``version`` 1: every plane in stream order (the layout before the 3-bit high plane moved).
    """
    k, n = codes.shape
    kb, nb, words = layout.packed_shape(k, n, bits)
    out = np.zeros((kb, nb, words), np.uint64)
    for kk in range(k):
        for nn in range(n):
            c = int(codes[kk, nn])
            t, kin = (kk % 256) // 16, kk % 16
            q, khalf, kodd = (kin % 8) // 2, kin // 8, kin % 2
            lane = 4 * (nn % 8) + q
            pair = (nn % 16) // 8 + 2 * khalf
            offset, shift = 0, 0
            for _, w in layout.PLANES[bits]:
                s = 8 * w * t + 2 * w * pair + w * kodd
                idx = offset + 128 * (s // 128) + 4 * lane + (s % 128) // 32
                bit = s % 32
                if bits == 3 and w == 1 and version >= 2:  # the high bits beside their low pair's nibble
                    j, v = t // 2, 4 * (t % 2) + pair
                    idx = offset + 4 * lane + j // 2
                    bit = 8 * (v // 2) + (0 if j % 2 else 4) + 2 * (v % 2) + kodd
                out[kk // 256, nn // 16, idx] |= ((c >> shift) & ((1 << w) - 1)) << bit
                shift += w
                offset += 128 * w
    return out.astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_matches_documented_formula(rng, bits):
    for k, n in [(256, 16), (300, 20), (40, 9)]:
        codes = rng.integers(0, 2**bits, (k, n)).astype(np.uint8)
        assert np.array_equal(np.asarray(fj.pack(codes, bits)), naive_pack_word_bits(codes, bits))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_inverts_pack_over_many_shapes(rng, bits):
    # Property test: random shapes, including ones not multiple of any block.
    for _ in range(12):
        k, n = int(rng.integers(1, 700)), int(rng.integers(1, 70))
        codes = rng.integers(0, 2**bits, (k, n)).astype(np.uint8)
        packed = fj.pack(codes, bits)
        assert packed.shape == layout.packed_shape(k, n, bits) and packed.dtype == jnp.uint32
        assert np.array_equal(np.asarray(fj.unpack(packed, bits, (k, n))), codes)


def test_pack_under_jit(rng):
    codes = rng.integers(0, 16, (300, 40)).astype(np.uint8)
    assert np.array_equal(np.asarray(jax.jit(lambda c: fj.pack(c, 4))(codes)), np.asarray(fj.pack(codes, 4)))


def test_slices_of_packed_are_packed_slices(rng):
    # The sharding contract: whole N-blocks / K-blocks of the packed array are the
    # packed array of that slice of the codes.
    codes = rng.integers(0, 8, (768, 64)).astype(np.uint8)
    packed = np.asarray(fj.pack(codes, 3))
    assert np.array_equal(packed[:, 2:4], np.asarray(fj.pack(codes[:, 32:64], 3)))
    assert np.array_equal(packed[1:3], np.asarray(fj.pack(codes[256:768], 3)))


def numpy_quantize(w, bits, group_size, table, dtype):
    """Direct numpy: absmax / table absmax per group, nearest entry by brute force."""
    k, n = w.shape
    rows = k if group_size == -1 else group_size
    g = -(-k // rows)
    t = np.asarray(jnp.asarray(table, dtype).astype(np.float32), np.float64)
    scales = np.zeros((g, n), np.float64)
    codes = np.zeros((k, n), np.int64)
    for gi in range(g):
        blk = w[gi * rows : (gi + 1) * rows].astype(np.float64)
        s = np.abs(blk).max(axis=0) / np.abs(t).max()
        s = np.asarray(jnp.asarray(s.astype(np.float32), dtype).astype(np.float32), np.float64)
        scales[gi] = s
        normalized = np.where(s == 0, 0.0, blk / np.where(s == 0, 1, s))
        codes[gi * rows : (gi + 1) * rows] = np.argmin(np.abs(normalized[..., None] - t), axis=-1)
    return t[codes] * np.repeat(scales, rows, axis=0)[:k]


@pytest.mark.parametrize("bits,group_size,table,dtype", [
    (4, 64, "nf", "bfloat16"), (3, 128, "int", "float16"), (2, -1, "fp", "float32"),
    (4, 32, "random", "float32"), (3, 256, "nf", "bfloat16"),
])
def test_dequantize_quantize_matches_numpy(rng, bits, group_size, table, dtype):
    k, n = int(rng.integers(50, 600)), int(rng.integers(1, 50))
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column: scale 0, weights 0
    if table == "random":
        table = np.sort(rng.uniform(-1, 1, 2**bits))
    tvals = tables.resolve(table, bits)
    qw = fj.quantize(w, bits=bits, group_size=group_size, table=table, dtype=jnp.dtype(dtype))
    assert qw.scales.shape == (-(-k // (k if group_size == -1 else group_size)), n)
    assert qw.scales.dtype == jnp.dtype(dtype) and qw.table.dtype == jnp.dtype(dtype)
    ours = np.asarray(fj.dequantize(qw, jnp.float32), np.float64)
    ref = numpy_quantize(w, bits, group_size, tvals, jnp.dtype(dtype))
    # Same rounding decisions except where a value sits on a decision boundary.
    assert np.mean(np.isclose(ours, ref, rtol=1e-6, atol=1e-7)) > 0.999
    assert abs(np.linalg.norm(ours - w) - np.linalg.norm(ref - w)) <= 1e-5 * np.linalg.norm(w)
    assert np.all(ours[:, 0] == 0)


def test_quantize_under_jit_matches_eager(rng):
    w = rng.standard_normal((300, 24)).astype(np.float32)
    eager = fj.quantize(w, bits=3, group_size=64)
    jitted = jax.jit(lambda w: fj.quantize(w, bits=3, group_size=64))(w)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert jitted.bits == 3 and jitted.shape == (300, 24)


def test_quantized_weight_is_a_pytree(rng):
    qw = fj.quantize(rng.standard_normal((64, 32)).astype(np.float32), bits=2, group_size=32)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 3
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.bits == 2 and back.group_size == 32 and back.shape == (64, 32)
    assert qw.table.shape == (4,) and qw.scales.shape == (2, 32)


def pack_version_1(codes, bits):
    """The version-1 layout (every plane in stream order), from the formula it documented."""
    return naive_pack_word_bits(codes, bits, version=1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_upgrade_codes_from_version_1(rng, bits):
    # Only 3-bit codes changed between layout versions 1 and 2; stacked (leading) axes too.
    codes = [rng.integers(0, 2**bits, (300, 20)).astype(np.uint8) for _ in range(2)]
    old = np.stack([pack_version_1(c, bits) for c in codes])
    new = np.asarray(layout.upgrade_codes(old, bits, 1))
    assert np.array_equal(new, np.stack([np.asarray(fj.pack(c, bits)) for c in codes]))
    assert (bits == 3) == (not np.array_equal(new, old))
    assert layout.upgrade_codes(new, bits, layout.LAYOUT_VERSION) is new
    with pytest.raises(ValueError, match="unknown code layout version"):
        layout.upgrade_codes(old, 3, 7)


def test_high_plane_positions_are_a_permutation():
    positions = [layout.high_plane_position(s) for s in range(128)]
    assert sorted(positions) == list(range(128))
    assert np.array_equal(np.asarray(positions)[layout.HIGH_PLANE_SOURCE], np.arange(128))


def test_three_bit_pair_indices_merge_by_byte(rng):
    # What the fast kernels rely on (flute_common.cuh, ThreeBitIndices): in a lane's words,
    # the 2-bit plane word j (t = 2 j + v // 4, pair v % 4) and the 1-bit plane word j // 2,
    # shifted by one constant each, give four pairs' 6-bit table indices in the bytes of
    # (low & 0x0F0F0F0F) | (high & 0x30303030): even code's low bits at 0-1, odd's at 2-3,
    # even's high bit at 4, odd's at 5.
    k, n = 512, 32
    codes = rng.integers(0, 8, (k, n)).astype(np.uint8)
    packed = np.asarray(fj.pack(codes, 3)).astype(np.uint64)
    for kb, nb, lane in [(0, 0, 0), (1, 1, 31), (0, 1, 13), (1, 0, 6)]:
        w = [int(packed[kb, nb, 128 * (i // 4) + 4 * lane + i % 4]) for i in range(8)]
        w += [int(packed[kb, nb, 256 + 4 * lane + i]) for i in range(4)]
        r, q = lane // 4, lane % 4
        for j in range(8):
            for odd in range(2):
                low = w[j] >> 4 if odd else w[j]
                at = (0 if j % 2 else 4) + 2 * odd
                high = (w[8 + j // 2] >> (at - 4)) if at >= 4 else (w[8 + j // 2] << (4 - at))
                merged = ((low & 0x0F0F0F0F) | (high & 0x30303030)) & 0xFFFFFFFF
                for m in range(4):
                    v = 2 * m + odd
                    t, pair = 2 * j + v // 4, v % 4
                    kk = 256 * kb + 16 * t + 2 * q + 8 * (pair // 2)
                    nn = 16 * nb + r + 8 * (pair % 2)
                    even_code, odd_code = int(codes[kk, nn]), int(codes[kk + 1, nn])
                    want = (even_code & 3) | (odd_code & 3) << 2 | (even_code >> 2) << 4 | (odd_code >> 2) << 5
                    assert (merged >> (8 * m)) & 0xFF == want
