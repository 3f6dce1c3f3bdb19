"""The Llama example's decode-step attention kernels (examples/decode_attention.py) in Pallas'
interpreter on CPU, against a float64 reference and XLA's path. The compiled kernels on a GPU:
tests/test_gpu_examples.py."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import rel_error

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import llama  # noqa: E402
import tp_inference  # noqa: E402

da = pytest.importorskip("decode_attention", reason="needs Pallas' Triton backend (jax.experimental.pallas.triton)")


def rope64(x: np.ndarray, pos: int, freqs: np.ndarray) -> np.ndarray:
    """Rotate-half rotary embedding of x [..., D] at position pos, in float64."""
    angles = np.float32(pos) * freqs.astype(np.float32)  # the angles the model computes (float32)
    cos, sin = np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], -1)


def reference_step(qkv, cache_k, cache_v, pos: int, freqs: np.ndarray):
    """float64 attention of one decode step: query and new key rotated (then rounded to the
    activations' dtype, as both paths store and use them), the new key and value at row pos,
    softmax over keys 0..pos. Returns (out [B, 1, heads, D], rotated key [B, kv_heads, D])."""
    dtype = qkv.dtype
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    x = f64(qkv)
    b, kv_heads, g2, d = x.shape
    group = g2 - 2
    rounded = lambda a: f64(jnp.asarray(a, jnp.float32).astype(dtype))  # noqa: E731
    q = rounded(rope64(x[:, :, :group], pos, freqs))  # [B, kv_heads, group, D]
    k_new = rounded(rope64(x[:, :, group], pos, freqs))
    k, v = f64(cache_k)[:, : pos + 1].copy(), f64(cache_v)[:, : pos + 1].copy()
    k[:, pos], v[:, pos] = k_new, x[:, :, group + 1]
    scores = np.einsum("bhgd,bshd->bhgs", q, k) / np.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhgs,bshd->bhgd", probs, v).reshape(b, 1, kv_heads * group, d)
    return out, k_new


def random_step(rng, b, length, kv_heads, group, head_dim, dtype=jnp.bfloat16):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return draw(b, kv_heads, group + 2, head_dim), draw(b, length, kv_heads, head_dim), draw(b, length, kv_heads, head_dim)


def run(qkv, cache_k, cache_v, pos, freqs, **kw):
    angles = jnp.float32(pos) * jnp.asarray(freqs, jnp.float32)
    return da.decode_step_attention(qkv, cache_k, cache_v, jnp.int32(pos), jnp.cos(angles), jnp.sin(angles),
                                    interpret=True, **kw)


@pytest.mark.parametrize("b,length,kv_heads,group,head_dim,splits,block_k", [
    (1, 100, 2, 4, 32, 4, 16),    # GQA 4, splits ending past the cache
    (2, 77, 4, 1, 64, 2, 32),     # MHA, a cache length of no power of two
    (3, 130, 2, 3, 32, None, 16), # 3 query heads per KV head (padded to 16 rows)
    (1, 40, 1, 8, 64, 1, 64),     # one split, one block larger than the cache
    (2, 200, 2, 2, 32, 16, 16),   # more splits than the prefix has blocks
])
def test_matches_reference(rng, b, length, kv_heads, group, head_dim, splits, block_k):
    freqs = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    for pos in (0, length // 3, length - 1):  # fresh inputs for every position
        qkv, cache_k, cache_v = random_step(rng, b, length, kv_heads, group, head_dim)
        out, new_k, new_v = run(qkv, cache_k, cache_v, pos, freqs, splits=splits, block_k=block_k)
        ref, ref_k = reference_step(qkv, cache_k, cache_v, pos, freqs)
        assert out.shape == (b, 1, kv_heads * group, head_dim) and out.dtype == qkv.dtype
        assert rel_error(out, ref) < 1e-2, pos
        # row pos holds the rotated key and the value; every other row is untouched
        assert rel_error(new_k[:, pos], ref_k) < 1e-2
        np.testing.assert_array_equal(new_v[:, pos], qkv[:, :, group + 1])
        keep = np.arange(length) != pos
        np.testing.assert_array_equal(np.asarray(new_k)[:, keep], np.asarray(cache_k)[:, keep])
        np.testing.assert_array_equal(np.asarray(new_v)[:, keep], np.asarray(cache_v)[:, keep])


def test_equals_xla_path_on_cache_and_close_on_output(rng):
    """Against the example's XLA path (apply_rope, dynamic_update_slice, attention_xla): the
    cache rows are the same bits; the outputs agree within bfloat16 rounding."""
    cfg_freqs = llama.rope_frequencies(llama.CONFIGS["8b"])  # Llama 3.1 scaled frequencies
    qkv, cache_k, cache_v = random_step(rng, 2, 150, 2, 4, 128)
    pos = 137
    out, new_k, new_v = run(qkv, cache_k, cache_v, pos, cfg_freqs)
    xla_out, xla_k, xla_v = llama._attention_by_xla(qkv[:, None], cache_k, cache_v, jnp.int32(pos), cfg_freqs)
    np.testing.assert_array_equal(new_k, xla_k)
    np.testing.assert_array_equal(new_v, xla_v)
    assert rel_error(out, np.asarray(xla_out.astype(jnp.float32), np.float64)) < 1e-2


def test_keys_past_pos_never_enter(rng):
    """Large keys and values past pos (stale cache rows) would take all the weight if read."""
    freqs = 1.0 / 10000 ** (np.arange(0, 32, 2) / 32)
    qkv, cache_k, cache_v = random_step(rng, 1, 90, 2, 2, 32)
    pos = 40
    loud_k = cache_k.at[:, pos:].set(50.0)
    loud_v = cache_v.at[:, pos:].set(1e4)
    out, _, _ = run(qkv, loud_k, loud_v, pos, freqs, splits=4, block_k=16)
    ref, _ = reference_step(qkv, cache_k, cache_v, pos, freqs)  # row pos comes from qkv in both
    assert rel_error(out, ref) < 1e-2


def test_nan_in_a_visible_key_propagates(rng):
    freqs = 1.0 / 10000 ** (np.arange(0, 32, 2) / 32)
    qkv, cache_k, cache_v = random_step(rng, 1, 64, 2, 2, 32)
    cache_k = cache_k.at[0, 5, 1, 3].set(jnp.nan)  # KV head 1's key at position 5
    out, _, _ = run(qkv, cache_k, cache_v, 20, freqs, splits=2, block_k=16)
    out = np.asarray(out.astype(jnp.float32))
    assert np.isnan(out[0, 0, 2:]).all()  # KV head 1's query heads
    assert np.isfinite(out[0, 0, :2]).all()  # KV head 0's are untouched
    # past pos it is never read
    out, _, _ = run(qkv, cache_k, cache_v, 4, freqs, splits=2, block_k=16)
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()


def test_repeatable(rng):
    freqs = 1.0 / 10000 ** (np.arange(0, 32, 2) / 32)
    qkv, cache_k, cache_v = random_step(rng, 2, 70, 2, 4, 32)
    first = run(qkv, cache_k, cache_v, 50, freqs, splits=4, block_k=16)
    second = run(qkv, cache_k, cache_v, 50, freqs, splits=4, block_k=16)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_a_clear_error():
    qkv = jnp.zeros((1, 2, 6, 32), jnp.bfloat16)
    cache = jnp.zeros((1, 16, 2, 32), jnp.bfloat16)
    cs = jnp.zeros((16,), jnp.float32)
    with pytest.raises(ValueError, match="group"):
        da.decode_step_attention(jnp.zeros((1, 2, 2, 32), jnp.bfloat16), cache, cache, 0, cs, cs)
    with pytest.raises(ValueError, match="caches"):
        da.decode_step_attention(qkv, jnp.zeros((1, 16, 3, 32), jnp.bfloat16), cache, 0, cs, cs)
    with pytest.raises(ValueError, match="dtype"):
        da.decode_step_attention(qkv, cache.astype(jnp.float16), cache.astype(jnp.float16), 0, cs, cs)
    with pytest.raises(ValueError, match="head_dim"):
        da.decode_step_attention(jnp.zeros((1, 2, 6, 48), jnp.bfloat16), jnp.zeros((1, 16, 2, 48), jnp.bfloat16),
                                 jnp.zeros((1, 16, 2, 48), jnp.bfloat16), 0, jnp.zeros(24), jnp.zeros(24))
    with pytest.raises(ValueError, match="cos"):
        da.decode_step_attention(qkv, cache, cache, 0, jnp.zeros(32), cs)
    with pytest.raises(ValueError, match="splits"):
        da.decode_step_attention(qkv, cache, cache, 0, cs, cs, splits=3)
    with pytest.raises(ValueError, match="block_k"):
        da.decode_step_attention(qkv, cache, cache, 0, cs, cs, block_k=24)


def test_attention_layer_choices_on_cpu(rng):
    """On CPU, auto takes XLA's path (no Pallas kernel in the program); an unknown choice is an error."""
    cfg = llama.CONFIGS["tiny"]
    cpu = jax.devices("cpu")[0]  # (the choice is made where the program is lowered: here for the CPU)
    qkv = jax.device_put(jnp.asarray(rng.standard_normal((1, 1, 4, 4, 128)), jnp.bfloat16), cpu)
    cache = jax.device_put(jnp.zeros((1, 8, 4, 128), jnp.bfloat16), cpu)
    freqs = llama.rope_frequencies(cfg)
    f = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "auto"))
    assert "triton" not in f.lower(qkv, cache, cache, jnp.int32(3)).as_text()
    out, _, _ = f(qkv, cache, cache, jnp.int32(3))
    ref, _, _ = llama._attention_by_xla(qkv, cache, cache, jnp.int32(3), freqs)
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="attention"):
        llama.attention_layer(qkv, cache, cache, 3, freqs, "flash")


def test_per_device_under_a_mesh(rng):
    """Under a (data, model) mesh with tp_inference.py's logical rules, the kernels run per device
    (a shard_map over batch and KV heads): results as on one device, no collective."""
    mesh = tp_inference.make_mesh(jax.devices("cpu"), 2, 4)
    b, length, kv_heads, group, head_dim = 4, 40, 4, 2, 32
    freqs = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    qkv, cache_k, cache_v = random_step(rng, b, length, kv_heads, group, head_dim)
    pos = 29
    ref, ref_k = reference_step(qkv, cache_k, cache_v, pos, freqs)
    f = jax.jit(lambda *a: llama.attention_layer(*a, freqs, "pallas"))
    with tp_inference.mesh_context(mesh), nn.logical_axis_rules(tp_inference.RULES):
        args = (jax.device_put(qkv[:, None], NamedSharding(mesh, P("data", None, "model", None, None))),
                jax.device_put(cache_k, NamedSharding(mesh, P("data", None, "model", None))),
                jax.device_put(cache_v, NamedSharding(mesh, P("data", None, "model", None))), jnp.int32(pos))
        assert tp_inference.collectives(f.lower(*args).compile().as_text()) == {}
        out, new_k, new_v = f(*args)
    assert out.sharding.spec == P("data", None, "model")
    assert rel_error(out, ref) < 1e-2
    assert rel_error(new_k[:, pos], ref_k) < 1e-2
    np.testing.assert_array_equal(new_v[:, pos], qkv[:, :, group + 1])
    # a mesh whose model axis doesn't divide the KV heads: "pallas" is an error, "auto" takes cuDNN's/XLA's path
    odd = tp_inference.make_mesh(jax.devices("cpu"), 1, 8)
    with tp_inference.mesh_context(odd), nn.logical_axis_rules(tp_inference.RULES):
        with pytest.raises(ValueError, match="divide"):
            jax.jit(lambda *a: llama.attention_layer(*a, freqs, "pallas")).lower(qkv[:, None], cache_k, cache_v,
                                                                                   jnp.int32(pos))
        out, _, _ = jax.jit(lambda *a: llama.attention_layer(*a, freqs, "auto"))(qkv[:, None], cache_k, cache_v,
                                                                                  jnp.int32(pos))
    assert rel_error(out, ref) < 1e-2


def test_tensor_parallel_decode_step_collectives():
    """The quantized tiny model's decode step on a (data 2, model 4) mesh with the Pallas attention
    and norm kernels: one all-reduce per row-parallel layer (o and down) and no other collective."""
    cfg = llama.CONFIGS["tiny"]
    quant = dict(bits=4, group_size=64, table="nf")
    mesh = tp_inference.make_mesh(jax.devices("cpu"), 2, 4)
    params = llama.init_params(cfg, 0, quant, dtype=jnp.bfloat16, mesh=mesh, rules=tp_inference.RULES)
    model = llama.Llama(cfg, quant=quant, dtype=jnp.bfloat16, attention="pallas", norm="pallas")
    step = jax.jit(lambda p, tok, cache, pos: model.apply({"params": p}, tok, cache, pos))
    place = tp_inference.placer(mesh)
    with tp_inference.mesh_context(mesh), nn.logical_axis_rules(tp_inference.RULES):
        hlo = step.lower(params, place(jnp.zeros((4, 1), jnp.int32)),
                         place(llama.init_cache(cfg, 4, 12, jnp.bfloat16)), jnp.int32(5)).compile().as_text()
    assert tp_inference.collectives(hlo) == {"all-reduce": 2 * cfg.layers}


def test_pos_outside_the_cache_is_clamped(rng):
    """pos past the cache means its last row, as XLA's path (dynamic_update_slice) has it; a
    negative pos writes row 0. Nothing outside the cache is read or written."""
    freqs = 1.0 / 10000 ** (np.arange(0, 32, 2) / 32)
    qkv, cache_k, cache_v = random_step(rng, 2, 48, 2, 2, 32)
    length = cache_k.shape[1]
    angles = jnp.float32(length - 1) * jnp.asarray(freqs, jnp.float32)
    last = da.decode_step_attention(qkv, cache_k, cache_v, jnp.int32(length - 1), jnp.cos(angles), jnp.sin(angles),
                                    splits=4, block_k=16, interpret=True)
    past = da.decode_step_attention(qkv, cache_k, cache_v, jnp.int32(length + 7), jnp.cos(angles), jnp.sin(angles),
                                    splits=4, block_k=16, interpret=True)
    for a, b in zip(last, past):
        np.testing.assert_array_equal(a, b)
    out, new_k, new_v = da.decode_step_attention(qkv, cache_k, cache_v, jnp.int32(-3), jnp.cos(angles),
                                                 jnp.sin(angles), splits=4, block_k=16, interpret=True)
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    np.testing.assert_array_equal(new_v[:, 0], qkv[:, :, 3])
    np.testing.assert_array_equal(np.asarray(new_v)[:, 1:], np.asarray(cache_v)[:, 1:])
