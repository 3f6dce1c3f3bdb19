"""The Llama example's residual add + RMSNorm kernel (examples/residual_norm.py) in Pallas'
interpreter on CPU, against a float64 reference and XLA's path, and the model with it. The
compiled kernel on a GPU: tests/test_gpu_examples.py."""

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

rn = pytest.importorskip("residual_norm", reason="needs Pallas' Triton backend (jax.experimental.pallas.triton)")


def reference(x, delta, scale, eps):
    """float64 RMSNorm of x + delta (the sum rounded to x's dtype first, as the model stores it)."""
    total = x if delta is None else (x.astype(jnp.float32) + delta.astype(jnp.float32)).astype(x.dtype)
    t = np.asarray(total.astype(jnp.float32), np.float64)
    normed = t / np.sqrt(np.mean(t * t, -1, keepdims=True) + eps)
    return total, normed * np.asarray(scale.astype(jnp.float32), np.float64)


def draw(rng, shape, dtype, spread=1.0):
    return jnp.asarray(rng.standard_normal(shape) * spread, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 1, 256), (2, 5, 128), (7, 16)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_matches_reference(rng, dtype, shape, with_delta):
    x = draw(rng, shape, dtype, 3.0)
    delta = draw(rng, shape, dtype) if with_delta else None
    scale = draw(rng, shape[-1:], dtype, 0.2) + 1
    total, normed = rn.add_rms_norm(x, delta, scale, 1e-5, interpret=True)
    ref_total, ref = reference(x, delta, scale, 1e-5)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    np.testing.assert_array_equal(total, ref_total)  # the sum is exactly rounded
    assert rel_error(normed, ref) < (1e-2 if dtype == jnp.bfloat16 else 2e-3)


def test_close_to_xla_path_and_repeatable(rng):
    """Against the model's XLA ops: the sum is the same bits, the normed rows agree within two
    roundings of bfloat16 (the normalized value and its product with the scale are each
    rounded, and XLA on a GPU sums the squares in another order); two runs give the same bits."""
    x, delta = draw(rng, (4, 1, 1024), jnp.bfloat16, 2.0), draw(rng, (4, 1, 1024), jnp.bfloat16)
    scale = draw(rng, (1024,), jnp.bfloat16, 0.1) + 1
    total, normed = rn.add_rms_norm(x, delta, scale, 1e-5, interpret=True)
    xla_total, xla_normed = llama._rms_norm_by_xla(x, delta, scale, 1e-5)
    np.testing.assert_array_equal(total, xla_total)
    a, b = np.asarray(normed.astype(jnp.float32)), np.asarray(xla_normed.astype(jnp.float32))
    assert np.all(np.abs(a - b) <= 2 ** -6 * np.abs(b))
    again = rn.add_rms_norm(x, delta, scale, 1e-5, interpret=True)
    np.testing.assert_array_equal(again[1], normed)


def test_nan_and_inf_stay_in_their_row(rng):
    x, delta = draw(rng, (3, 256), jnp.bfloat16), draw(rng, (3, 256), jnp.bfloat16)
    scale = jnp.ones((256,), jnp.bfloat16)
    x = x.at[1, 7].set(jnp.nan).at[2, 9].set(jnp.inf)
    total, normed = rn.add_rms_norm(x, delta, scale, 1e-5, interpret=True)
    normed = np.asarray(normed.astype(jnp.float32))
    assert np.isfinite(normed[0]).all()
    assert np.isnan(normed[1]).all()  # the mean of squares is NaN
    assert np.isnan(normed[2, 9]) and (normed[2, np.arange(256) != 9] == 0).all()  # inf / inf, finite / inf
    assert np.isnan(np.asarray(total.astype(jnp.float32))[1, 7])


def test_bad_input_is_a_clear_error():
    x = jnp.zeros((2, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two"):
        rn.add_rms_norm(x, None, jnp.ones((96,), jnp.bfloat16), 1e-5)
    x = jnp.zeros((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two"):
        rn.add_rms_norm(x.astype(jnp.float32), None, jnp.ones((128,)), 1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        rn.add_rms_norm(x, None, jnp.ones((64,), jnp.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        rn.add_rms_norm(x, jnp.zeros((2, 128), jnp.float16), jnp.ones((128,), jnp.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="norm"):
        llama.residual_rms_norm(x, None, jnp.ones((128,), jnp.bfloat16), 1e-5, "fused")
    # auto where the kernel does not fit takes XLA's ops; "pallas" says why it cannot
    odd = jnp.ones((2, 96), jnp.bfloat16)
    _, normed = llama.residual_rms_norm(odd, None, jnp.ones((96,), jnp.bfloat16), 1e-5, "auto")
    np.testing.assert_array_equal(normed, llama._rms_norm_by_xla(odd, None, jnp.ones((96,), jnp.bfloat16), 1e-5)[1])
    with pytest.raises(ValueError, match="Pallas norm"):
        llama.residual_rms_norm(odd, None, jnp.ones((96,), jnp.bfloat16), 1e-5, "pallas")


def test_model_with_the_kernel_matches_xla_ops(rng):
    """The tiny model's prompt and decode step with norm="pallas" (interpreter) against
    norm="xla": logits within bfloat16 rounding, the same greedy tokens; on CPU, auto is XLA's."""
    cfg = llama.CONFIGS["tiny"]
    params = nn.meta.unbox(llama.random_params(cfg, 0))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (2, 5)), jnp.int32)
    out = {}
    for norm in ("pallas", "xla", "auto"):
        model = llama.Llama(cfg, norm=norm, attention="xla")
        cache = llama.init_cache(cfg, 2, 8)
        logits, cache = model.apply({"params": params}, tokens, cache, 0)
        step, _ = model.apply({"params": params}, tokens[:, -1:], cache, 5)
        out[norm] = (np.asarray(logits), np.asarray(step))
    for a, b in zip(out["pallas"], out["xla"]):
        assert rel_error(a, b.astype(np.float64)) < 1e-2
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    for a, b in zip(out["auto"], out["xla"]):
        np.testing.assert_array_equal(a, b)
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.ones((1, 1, cfg.dim), jnp.bfloat16), cpu)
    f = jax.jit(lambda x, s: llama.residual_rms_norm(x, x, s, 1e-5, "auto"))
    assert "triton" not in f.lower(x, x[0, 0]).as_text()


def test_per_device_under_a_mesh(rng):
    """Under a (data 2, model 4) mesh with tp_inference.py's rules, the kernel runs per device (a
    shard_map over the batch axis): results as on one device, no collective. A mesh whose data
    axis doesn't divide the batch: "pallas" is an error, "auto" takes XLA's ops."""
    mesh = tp_inference.make_mesh(jax.devices("cpu"), 2, 4)
    x, delta = draw(rng, (4, 1, 256), jnp.bfloat16), draw(rng, (4, 1, 256), jnp.bfloat16)
    scale = draw(rng, (256,), jnp.bfloat16, 0.1) + 1
    ref_total, ref = reference(x, delta, scale, 1e-5)
    f = jax.jit(lambda *a: llama.residual_rms_norm(*a, 1e-5, "pallas"))
    with tp_inference.mesh_context(mesh), nn.logical_axis_rules(tp_inference.RULES):
        rows = NamedSharding(mesh, P("data", None, None))
        args = (jax.device_put(x, rows), jax.device_put(delta, rows), jax.device_put(scale, NamedSharding(mesh, P())))
        assert tp_inference.collectives(f.lower(*args).compile().as_text()) == {}
        total, normed = f(*args)
    assert normed.sharding.spec[0] == "data"
    np.testing.assert_array_equal(total, ref_total)
    assert rel_error(normed, ref) < 1e-2
    x3, d3 = x[:3], delta[:3]
    with tp_inference.mesh_context(mesh), nn.logical_axis_rules(tp_inference.RULES):
        with pytest.raises(ValueError, match="Pallas norm"):
            jax.jit(lambda *a: llama.residual_rms_norm(*a, 1e-5, "pallas")).lower(x3, d3, scale)
        _, normed = jax.jit(lambda *a: llama.residual_rms_norm(*a, 1e-5, "auto"))(x3, d3, scale)
    assert rel_error(normed, ref[:3]) < 1e-2
