"""A decode step's attention as two Pallas kernels (NVIDIA GPUs): rotary embedding, the KV
cache update and split-K attention ("flash decoding") in the first, the splits' combination
in the second.

    out, cache_k, cache_v = decode_step_attention(qkv, cache_k, cache_v, pos, cos, sin)

A decode step's attention reads the whole KV cache for one query token per sequence: it is
memory-bound and short. Done by XLA and cuDNN it is six kernels per layer on an H200 (the
rotary embedding's two fusions, two cache updates, cuDNN's prefill-style flash kernel and
its reduction), each paying a launch and a ramp, and the flash kernel runs one block per
query head, which leaves most of the GPU idle and reads each KV head once per query head.
Here:

1. ``_split_kernel``, grid (batch, kv_heads, splits). A program takes all query heads of
   one KV head (GQA: they read the same keys, so each key is read once per KV head) and a
   contiguous range of the visible keys 0 .. pos, and keeps an online softmax over it: the
   unnormalized output, the running maximum, the sum of exponentials. The visible length
   is split evenly over the programs at run time, so a short prefix of a long cache still
   spreads over all of them. Each program applies the rotary embedding to its query rows
   and to the step's new key itself (a few hundred values), and takes the new key and
   value (position pos) from the projection's output, not from the cache: no program
   reads cache row pos. Program 0 of each (sequence, KV head) writes the new key and value
   into that row. The caches are aliased in place (``input_output_aliases``), so a decode
   loop that carries them updates them without a copy.
2. ``_combine_kernel``, grid (batch, kv_heads, group), one query head per program: rescales the splits' parts to their common
   maximum, sums them in split order (deterministic) and normalizes.

Numerics follow ``llama.py``'s XLA path (rotary embedding in float32, rounded to the
activations' dtype; scores, softmax and sums in float32; probabilities meet V in the
cache's dtype); results agree within bfloat16 rounding, not bitwise. Keys past pos never
enter: their rows are not loaded, and their scores are -inf.

On CPU the kernels run in Pallas' interpreter (``interpret=True``), which the CPU tests use;
the Llama example takes XLA's path there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_ROWS = 16  # Triton's dot needs 16 rows: a KV head's query heads are padded to this


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def default_splits(batch: int, kv_heads: int, cache_len: int, block_k: int, target_programs: int = 256) -> int:
    """Splits per (sequence, KV head): a power of two giving about ``target_programs``
    programs (two per multiprocessor of an H100 or H200), at most one per ``block_k``
    keys of the cache."""
    want = _pow2_at_least(-(-target_programs // (batch * kv_heads)))
    most = _pow2_at_least(-(-cache_len // block_k))
    return max(1, min(want, most, 64))


def _rope(lo, hi, cos, sin, dtype):
    """Rotate-half rotary embedding of rows whose first and second half of features are lo
    and hi ([rows, D/2]); cos, sin [D/2] float32. Returns the rotated halves in dtype."""
    lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)


def _split_kernel(pos_ref, cos_ref, sin_ref, qkv_ref, k_ref, v_ref, o_ref, m_ref, l_ref, k_out, v_out, *,
                  group: int, rows: int, splits: int, block_k: int, scale: float):
    """Program (b, h, j): KV head h's query heads against split j of the visible keys.

    qkv_ref [kv_heads, group + 2, D] (sequence b's projection output: per KV head its query
    heads, key, value); k_ref, v_ref [S, kv_heads, D] (its caches; k_out, v_out are the same
    buffers); o_ref [rows, D] float32, unnormalized; m_ref, l_ref [rows] float32."""
    h, j = pl.program_id(1), pl.program_id(2)
    pos = pos_ref[()]
    length = pos + 1
    chunk = pl.cdiv(pl.cdiv(length, splits), block_k) * block_k  # whole blocks
    start = j * chunk
    stop = jnp.minimum(start + chunk, length)
    half = qkv_ref.shape[-1] // 2
    dtype = qkv_ref.dtype
    cos, sin = cos_ref[...], sin_ref[...]
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    # The query rows (padded to `rows` with zeros) and the new key and value, rotated.
    row = jnp.arange(rows)
    q_mask = (row < group)[:, None]
    q_lo, q_hi = _rope(plgpu.load(qkv_ref.at[h, pl.ds(0, rows), lo], mask=q_mask, other=0.0),
                       plgpu.load(qkv_ref.at[h, pl.ds(0, rows), hi], mask=q_mask, other=0.0), cos, sin, dtype)
    k_lo, k_hi = _rope(qkv_ref[h, group, lo], qkv_ref[h, group, hi], cos, sin, dtype)
    v_new_lo, v_new_hi = qkv_ref[h, group + 1, lo], qkv_ref[h, group + 1, hi]

    # Keys from the cache: [start, min(stop, pos)) (row pos is the new key, added below).
    # Every block of the loop holds at least one such key, so m is finite after the first.
    cached_stop = jnp.minimum(stop, pos)
    offsets = jnp.arange(block_k)

    def step(i, carry):
        acc_lo, acc_hi, m, l = carry
        first = start + i * block_k
        valid = (first + offsets < cached_stop)[:, None]
        keys = pl.ds(first, block_k)
        s = (plgpu.dot(q_lo, plgpu.load(k_ref.at[keys, h, lo], mask=valid, other=0.0), trans_b=True)
             + plgpu.dot(q_hi, plgpu.load(k_ref.at[keys, h, hi], mask=valid, other=0.0), trans_b=True)) * scale
        s = jnp.where(valid.reshape(1, block_k), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp(s - m_new[:, None])
        p_v = p.astype(dtype)
        acc_lo = acc_lo * alpha[:, None] + plgpu.dot(p_v, plgpu.load(v_ref.at[keys, h, lo], mask=valid, other=0.0))
        acc_hi = acc_hi * alpha[:, None] + plgpu.dot(p_v, plgpu.load(v_ref.at[keys, h, hi], mask=valid, other=0.0))
        return acc_lo, acc_hi, m_new, l * alpha + p.sum(axis=1)

    zeros = jnp.zeros((rows, half), jnp.float32)
    init = (zeros, zeros, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
    steps = pl.cdiv(jnp.maximum(cached_stop - start, 0), block_k)
    acc_lo, acc_hi, m, l = jax.lax.fori_loop(0, steps, step, init)

    # The new key (position pos) belongs to the split whose range holds pos: the last
    # non-empty one.
    has_pos = (start <= pos) & (pos < stop)
    s_new = ((q_lo.astype(jnp.float32) * k_lo.astype(jnp.float32)[None, :]).sum(axis=1)
             + (q_hi.astype(jnp.float32) * k_hi.astype(jnp.float32)[None, :]).sum(axis=1)) * scale
    m_new = jnp.maximum(m, s_new)
    alpha = jnp.exp(m - m_new)
    p_new = jnp.exp(s_new - m_new).astype(dtype).astype(jnp.float32)
    l_pos = l * alpha + jnp.exp(s_new - m_new)
    o_ref[:, lo] = jnp.where(has_pos, acc_lo * alpha[:, None] + p_new[:, None] * v_new_lo.astype(jnp.float32)[None, :],
                             acc_lo)
    o_ref[:, hi] = jnp.where(has_pos, acc_hi * alpha[:, None] + p_new[:, None] * v_new_hi.astype(jnp.float32)[None, :],
                             acc_hi)
    m_ref[...] = jnp.where(has_pos, m_new, m)
    l_ref[...] = jnp.where(has_pos, l_pos, l)

    @pl.when(j == 0)
    def _():
        k_out[pos, h, lo] = k_lo
        k_out[pos, h, hi] = k_hi
        v_out[pos, h, lo] = v_new_lo
        v_out[pos, h, hi] = v_new_hi


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, group: int):
    """Program (b, h, r): query head r of KV head h's group, from its splits' parts.
    o_ref [splits, rows, D], m_ref, l_ref [splits, rows]; out_ref [heads, D] (sequence b)."""
    h, r = pl.program_id(1), pl.program_id(2)
    m = m_ref[:, r]
    top = m.max()  # finite: split 0 always holds key 0
    weight = jnp.exp(m - top)  # 0 for empty splits (m = -inf)
    total = (weight * l_ref[:, r]).sum()
    out = (weight[:, None] * o_ref[:, r, :]).sum(axis=0) / total
    out_ref[h * group + r, :] = out.astype(out_ref.dtype)


def decode_step_attention(qkv: jax.Array, cache_k: jax.Array, cache_v: jax.Array, pos: jax.Array, cos: jax.Array,
                          sin: jax.Array, *, splits: int | None = None, block_k: int = 64,
                          interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention, with the rotary embedding and the KV cache update.

    qkv [B, kv_heads, group + 2, D] (float16/bfloat16): the fused projection's output for the
    step's token, per KV head its ``group`` query heads, then its key and value, before the
    rotary embedding. cache_k, cache_v [B, S, kv_heads, D] hold keys and values of positions
    0 .. pos - 1; pos is an int32 scalar (the same for every sequence), clamped into [0, S - 1]
    as ``lax.dynamic_update_slice`` clamps. cos, sin [D / 2]
    float32: the rotary embedding's cos and sin of pos times each frequency.

    Returns (out [B, 1, heads, D] in qkv's dtype, cache_k, cache_v with row pos set to the
    step's rotated key and its value); query head h reads KV head h // group. ``splits``:
    programs per (sequence, KV head), a power of two (default :func:`default_splits`);
    ``block_k``: keys per loop step (a power of two >= 16); ``interpret``: run in Pallas'
    interpreter (CPU).
    """
    b, kv_heads, g2, head_dim = qkv.shape
    group = g2 - 2
    cache_len = cache_k.shape[1]
    if group < 1:
        raise ValueError(f"qkv must be [B, kv_heads, group + 2, D] with group >= 1, got {qkv.shape}")
    if cache_k.shape != (b, cache_len, kv_heads, head_dim) or cache_v.shape != cache_k.shape:
        raise ValueError(f"caches {cache_k.shape} / {cache_v.shape} don't match qkv {qkv.shape}")
    if cache_k.dtype != qkv.dtype or cache_v.dtype != qkv.dtype:
        raise ValueError(f"caches ({cache_k.dtype}, {cache_v.dtype}) must have qkv's dtype {qkv.dtype}")
    if head_dim & (head_dim - 1) or head_dim < 32:
        raise ValueError(f"head_dim must be a power of two >= 32 (Triton tiles of half of it), got {head_dim}")
    if cos.shape != (head_dim // 2,) or sin.shape != (head_dim // 2,):
        raise ValueError(f"cos and sin must be [{head_dim // 2}], got {cos.shape} / {sin.shape}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    splits = default_splits(b, kv_heads, cache_len, block_k) if splits is None else splits
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    rows = max(MIN_ROWS, _pow2_at_least(group))
    heads = kv_heads * group
    # Clamped into the cache, as dynamic_update_slice clamps its start: a pos past the cache then
    # means its last row (XLA's path does the same), and no program reads or writes outside it.
    pos = jnp.clip(jnp.asarray(pos, jnp.int32).reshape(()), 0, cache_len - 1)
    cos, sin = cos.astype(jnp.float32), sin.astype(jnp.float32)

    cache_spec = pl.BlockSpec((None, cache_len, kv_heads, head_dim), lambda i, h, j: (i, 0, 0, 0))
    scalar = pl.BlockSpec((), lambda i, h, j: ())
    vector = pl.BlockSpec((head_dim // 2,), lambda i, h, j: (0,))
    split = pl.pallas_call(
        functools.partial(_split_kernel, group=group, rows=rows, splits=splits, block_k=block_k,
                          scale=1.0 / math.sqrt(head_dim)),
        grid=(b, kv_heads, splits),
        in_specs=[scalar, vector, vector, pl.BlockSpec((None, kv_heads, g2, head_dim), lambda i, h, j: (i, 0, 0, 0)),
                  cache_spec, cache_spec],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda i, h, j: (i, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            cache_spec, cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
            jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype),
        ],
        input_output_aliases={4: 3, 5: 4},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_split",
    )
    o, m, l, cache_k, cache_v = split(pos, cos, sin, qkv, cache_k, cache_v)

    combine = pl.pallas_call(
        functools.partial(_combine_kernel, group=group),
        grid=(b, kv_heads, group),
        in_specs=[
            pl.BlockSpec((None, None, splits, rows, head_dim), lambda i, h, r: (i, h, 0, 0, 0)),
            pl.BlockSpec((None, None, splits, rows), lambda i, h, r: (i, h, 0, 0)),
            pl.BlockSpec((None, None, splits, rows), lambda i, h, r: (i, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, heads, head_dim), lambda i, h, r: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, heads, head_dim), qkv.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="decode_attention_combine",
    )
    return combine(o, m, l).reshape(b, 1, heads, head_dim), cache_k, cache_v
