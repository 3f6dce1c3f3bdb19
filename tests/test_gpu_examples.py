"""The Llama example's decode attention on a GPU: the Pallas kernels of decode_attention.py
and cuDNN's fused kernel, against float64 references and XLA's path (skipped without a GPU).

    pytest -q tests/test_gpu_examples.py
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import gpu_available, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import llama  # noqa: E402
from test_decode_attention import random_step, reference_step  # noqa: E402
from test_residual_norm import reference as reference_norm  # noqa: E402


def reference_attention(query, cache_k, cache_v, pos: int) -> np.ndarray:
    """float64 attention of one decode step over keys 0..pos: [B, 1, heads, D]."""
    q, k, v = (np.asarray(a.astype(jnp.float32), np.float64) for a in (query, cache_k, cache_v))
    b, _, heads, d = q.shape
    group = heads // k.shape[2]
    k, v = np.repeat(k[:, : pos + 1], group, axis=2), np.repeat(v[:, : pos + 1], group, axis=2)  # [B, pos+1, heads, D]
    scores = np.einsum("bhd,bshd->bhs", q[:, 0], k) / np.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhs,bshd->bhd", probs, v)[:, None]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim", [(1, 544, 32, 8, 128), (2, 300, 64, 8, 128),
                                                                  (3, 77, 8, 2, 64), (2, 300, 4, 4, 128)])
def test_cudnn_attention_matches_reference(rng, dtype, batch, length, heads, kv_heads, head_dim):
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    run = {how: jax.jit(lambda q, k, v, p, how=how: llama.attend(q, k, v, p, how)) for how in ("cudnn", "xla")}
    for pos in (0, length // 3, length - 1):  # fresh inputs for every position
        query = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim)), dtype)
        cache_k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype)
        cache_v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype)
        ref = reference_attention(query, cache_k, cache_v, pos)
        for how, f in run.items():
            out = f(query, cache_k, cache_v, jnp.int32(pos))
            assert out.shape == query.shape and out.dtype == dtype
            assert rel_error(out, ref) < tol, (how, pos)
        # keys past pos are masked: large ones there would otherwise take all the weight
        loud_k = cache_k.at[:, pos + 1:].set(30.0 * jnp.sign(query[:, :1, :kv_heads]))
        loud_v = cache_v.at[:, pos + 1:].set(1000.0)
        for how, f in run.items():
            out = f(query, loud_k, loud_v, jnp.int32(pos))
            assert rel_error(out, ref) < tol, (how, pos)


def test_cudnn_lowers_for_decode_steps_only():
    q = jnp.zeros((2, 1, 8, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 64, 2, 128), jnp.bfloat16)
    hlo = jax.jit(lambda q, k, v, p: llama.attend(q, k, v, p, "cudnn")).lower(q, kv, kv, jnp.int32(5)).as_text()
    assert "cudnn" in hlo
    prompt = jnp.zeros((2, 4, 8, 128), jnp.bfloat16)  # prompts take XLA's path
    hlo = jax.jit(lambda q, k, v, p: llama.attend(q, k, v, p, "cudnn")).lower(prompt, kv, kv, jnp.int32(0)).as_text()
    assert "cudnn" not in hlo


def test_platform_choices_on_the_cpu_devices_of_a_gpu_machine(rng):
    """"cudnn" and "auto" are chosen where the step is lowered: compiled for the CPU, both take
    XLA's path."""
    cpu = jax.devices("cpu")[0]
    query = jax.device_put(jnp.asarray(rng.standard_normal((2, 1, 8, 64)), jnp.bfloat16), cpu)
    cache = jax.device_put(jnp.asarray(rng.standard_normal((2, 40, 2, 64)), jnp.bfloat16), cpu)
    f = jax.jit(lambda q, k, v, p: llama.attend(q, k, v, p, "cudnn"))
    assert "cudnn" not in f.lower(query, cache, cache, jnp.int32(9)).as_text()
    out = f(query, cache, cache, jnp.int32(9))
    assert list(out.devices())[0].platform == "cpu"
    assert rel_error(out, reference_attention(query, cache, cache, 9)) < 1e-2
    qkv = jax.device_put(jnp.asarray(rng.standard_normal((2, 1, 2, 6, 64)), jnp.bfloat16), cpu)
    freqs = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    g = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "auto"))
    assert "triton" not in g.lower(qkv, cache, cache, jnp.int32(9)).as_text()
    out, _, _ = g(qkv, cache, cache, jnp.int32(9))
    assert list(out.devices())[0].platform == "cpu"


PALLAS_SHAPES = [(1, 544, 8, 4, 128),   # 8B-shaped, batch 1
                 (2, 300, 8, 8, 128),   # 70B-shaped GQA
                 (16, 530, 8, 4, 128),  # batch 16
                 (1, 2048, 8, 4, 128),  # a longer cache
                 (3, 77, 2, 3, 64),     # odd group and length
                 (2, 100, 4, 1, 32)]    # MHA, small head


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("b,length,kv_heads,group,head_dim", PALLAS_SHAPES)
def test_pallas_step_matches_reference(rng, dtype, b, length, kv_heads, group, head_dim):
    """The compiled kernels (rotary embedding, cache update, split-K attention) against the
    float64 reference; the cache rows against XLA's path, bitwise; keys past pos masked."""
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    freqs = llama.rope_frequencies(llama.CONFIGS["8b"])[: head_dim // 2] if head_dim == 128 else \
        1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    pallas = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "pallas"))
    xla = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "xla"))
    for pos in (0, length // 3, length - 1):  # fresh inputs for every position
        qkv, cache_k, cache_v = random_step(rng, b, length, kv_heads, group, head_dim, dtype)
        ref, _ = reference_step(qkv, cache_k, cache_v, pos, freqs)
        out, new_k, new_v = pallas(qkv[:, None], cache_k, cache_v, jnp.int32(pos))
        assert out.shape == (b, 1, kv_heads * group, head_dim) and out.dtype == dtype
        assert rel_error(out, ref) < tol, pos
        _, xla_k, xla_v = xla(qkv[:, None], cache_k, cache_v, jnp.int32(pos))
        np.testing.assert_array_equal(new_k, xla_k)
        np.testing.assert_array_equal(new_v, xla_v)
        again = pallas(qkv[:, None], cache_k, cache_v, jnp.int32(pos))  # the same bits every run
        np.testing.assert_array_equal(again[0], out)
        # stale rows past pos, large enough to take all the weight if they were read
        loud_k = cache_k.at[:, pos + 1:].set(30.0)
        loud_v = cache_v.at[:, pos + 1:].set(1000.0)
        out, _, _ = pallas(qkv[:, None], loud_k, loud_v, jnp.int32(pos))
        assert rel_error(out, ref) < tol, pos


def test_auto_lowers_to_pallas_for_decode_steps():
    qkv = jnp.zeros((2, 1, 2, 6, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 64, 2, 128), jnp.bfloat16)
    freqs = np.ones(64)
    f = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "auto"))
    assert "triton" in f.lower(qkv, kv, kv, jnp.int32(5)).as_text()  # Pallas' kernels are Triton custom calls
    prompt = jnp.zeros((2, 4, 2, 6, 128), jnp.bfloat16)  # prompts take XLA's path
    assert "triton" not in f.lower(prompt, kv, kv, jnp.int32(0)).as_text()


@pytest.mark.parametrize("how", ["pallas", "cudnn"])
def test_decode_loop_matches_xla(how):
    """The quantized tiny model's decode steps: close logits either way, teacher-forced."""
    cfg = llama.CONFIGS["tiny"]
    dense = nn.meta.unbox(llama.random_params(cfg, seed=11))
    params = llama.quantize(dense, bits=4, group_size=64)
    quant = dict(bits=4, group_size=64, table="nf")
    # (the reference takes XLA's ops for its norms too; the other model Pallas' norm kernel)
    models = {h: llama.Llama(cfg, quant=quant, attention=h, norm="auto" if h == how else "xla") for h in (how, "xla")}
    prompt = np.random.default_rng(4).integers(0, cfg.vocab, (3, 5)).astype(np.int32)
    logits = {}
    for h, model in models.items():
        step = llama.make_step(model)
        cache = llama.init_cache(cfg, 3, 16)
        out, cache = step(params, jnp.asarray(prompt), cache, jnp.int32(0))
        token, rows = jnp.argmax(out[:, -1:], -1).astype(jnp.int32), []
        for i in range(6):  # fixed next tokens (the first from the prompt pass, XLA in both), so both see the same inputs
            out, cache = step(params, token, cache, jnp.int32(5 + i))
            rows.append(np.asarray(out[:, 0]))
            token = jnp.asarray(np.arange(3)[:, None] * 7 + i, jnp.int32)
        logits[h] = np.stack(rows, 1)
    assert rel_error(logits[how], logits["xla"]) < 2e-2
    # the on-device loop (a lax.scan) runs through the same kernels
    loop = llama.make_decode_loop(models[how], 4)
    args = (params, jnp.asarray(prompt[:, -1:]), llama.init_cache(cfg, 3, 16), jnp.int32(5))
    assert {"pallas": "triton", "cudnn": "cudnn"}[how] in loop.lower(*args).as_text()
    tokens, _ = loop(*args)
    assert tokens.shape == (3, 4) and np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < cfg.vocab))


def test_pallas_pos_past_the_cache_is_its_last_row(rng):
    """Compiled: a pos past the cache writes and attends as its last row (as XLA's path does),
    never outside the cache."""
    freqs = llama.rope_frequencies(llama.CONFIGS["8b"])
    qkv, cache_k, cache_v = random_step(rng, 2, 300, 8, 4, 128)
    pallas = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "pallas"))
    xla = jax.jit(lambda q, k, v, p: llama.attention_layer(q, k, v, p, freqs, "xla"))
    out, new_k, new_v = pallas(qkv[:, None], cache_k, cache_v, jnp.int32(300 + 37))
    ref, ref_k, ref_v = xla(qkv[:, None], cache_k, cache_v, jnp.int32(300 + 37))
    np.testing.assert_array_equal(new_k, ref_k)
    np.testing.assert_array_equal(new_v, ref_v)
    assert rel_error(out, np.asarray(ref.astype(jnp.float32), np.float64)) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (16, 1, 4096), (2, 7, 8192), (5, 1, 512)])
def test_pallas_norm_matches_reference(rng, dtype, shape):
    """Compiled residual add + RMSNorm (residual_norm.py): the sum exactly rounded, the normed
    rows against float64, the same bits every run; also without a residual."""
    norm = jax.jit(lambda x, d, s: llama.residual_rms_norm(x, d, s, 1e-5, "pallas"))
    for delta_too in (True, False):  # fresh inputs for each
        x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
        delta = jnp.asarray(rng.standard_normal(shape), dtype) if delta_too else None
        scale = jnp.asarray(rng.standard_normal(shape[-1:]) * 0.2 + 1, dtype)
        total, normed = norm(x, delta, scale)
        ref_total, ref = reference_norm(x, delta, scale, 1e-5)
        np.testing.assert_array_equal(total, ref_total)
        assert rel_error(normed, ref) < (1e-2 if dtype == jnp.bfloat16 else 2e-3)
        np.testing.assert_array_equal(norm(x, delta, scale)[1], normed)


def test_auto_norm_lowers_to_pallas():
    x = jnp.zeros((2, 1, 4096), jnp.bfloat16)
    scale = jnp.ones((4096,), jnp.bfloat16)
    f = jax.jit(lambda x, d, s: llama.residual_rms_norm(x, d, s, 1e-5, "auto"))
    assert "triton" in f.lower(x, x, scale).as_text()
    odd = jnp.zeros((2, 1, 3072), jnp.bfloat16)  # not a power of two: XLA's ops
    assert "triton" not in f.lower(odd, odd, jnp.ones((3072,), jnp.bfloat16)).as_text()
