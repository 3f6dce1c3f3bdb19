"""Learned Normal Float (flute_jax.calibrate): never worse than NF on calibration data,
better on held-out data, consistent codes, whole Flax param trees (stacked layers too)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from flute_jax.calibrate import calibrate, calibrate_kernel, nearest_codes, output_error


def correlated_activations(rng, m, k, mixing, channel_scale):
    """Activations with correlated features and a few large channels (as in LLMs)."""
    return (rng.standard_normal((m, k)) @ mixing) * channel_scale


def activation_model(rng, k):
    mixing = rng.standard_normal((k, k)) / np.sqrt(k)
    channel_scale = np.exp(rng.normal(0.0, 1.0, k))
    return mixing, channel_scale


def err64(x, w, qw):
    """float64 relative output error, independent of calibrate's own helper."""
    x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    codes = np.asarray(fj.unpack(qw.codes, qw.bits, qw.shape)).astype(np.int64)
    t = np.asarray(qw.table.astype(jnp.float32), np.float64)
    s = np.asarray(qw.scales.astype(jnp.float32), np.float64)
    w_hat = t[codes] * np.repeat(s, qw.group_rows, axis=0)[: w.shape[0]]
    ref = x @ np.asarray(w, np.float64)
    return np.linalg.norm(ref - x @ w_hat) / np.linalg.norm(ref)


@pytest.mark.parametrize(
    "bits,group_size,dtype,learn_table,k,n",
    [
        (4, 64, jnp.bfloat16, False, 192, 40),
        (3, 32, jnp.float16, True, 100, 33),  # K not a multiple of the group size
        (2, -1, jnp.float32, False, 96, 17),
        (2, 128, jnp.bfloat16, True, 256, 24),
    ],
)
def test_learned_never_worse_and_better_held_out(rng, bits, group_size, dtype, learn_table, k, n):
    mixing, channel_scale = activation_model(rng, k)
    # float32 inputs: calibrate computes in float32, so the float64 checks below see the same numbers.
    x_cal = correlated_activations(rng, 384, k, mixing, channel_scale).astype(np.float32)
    x_held = correlated_activations(rng, 384, k, mixing, channel_scale).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    start = fj.quantize(w, bits, group_size, "nf", dtype)
    qw, rep = calibrate_kernel(
        w, x_cal, bits=bits, group_size=group_size, dtype=dtype, learn_table=learn_table, steps=60, progress=False
    )
    qw.validate()
    assert (qw.bits, qw.group_size, qw.shape, qw.dtype) == (bits, group_size, (k, n), jnp.dtype(dtype))
    start_cal, learned_cal = err64(x_cal, w, start), err64(x_cal, w, qw)
    # The report is the float64 error of exactly what was returned and of the NF start.
    assert rep.start_error == pytest.approx(start_cal, rel=1e-9)
    assert rep.final_error == pytest.approx(learned_cal, rel=1e-9)
    assert learned_cal <= start_cal
    # In these seeded cases learning really helps, on calibration and on held-out data.
    assert rep.learned and learned_cal < 0.97 * start_cal
    assert err64(x_held, w, qw) < 0.98 * err64(x_held, w, start)
    if not learn_table:
        np.testing.assert_array_equal(np.asarray(qw.table), np.asarray(start.table))


def test_codes_are_nearest_entries_of_learned_scales_and_table(rng):
    k, n, bits = 128, 48, 3
    mixing, channel_scale = activation_model(rng, k)
    x = correlated_activations(rng, 64, k, mixing, channel_scale)  # M < K: the direct (non-Gram) loss
    w = rng.standard_normal((k, n))
    qw, rep = calibrate_kernel(w, x, bits=bits, group_size=32, learn_table=True, steps=30, progress=False)
    assert rep.learned
    # Codes are what quantize's rule gives for the stored scales and table: the nearest entry of w / s.
    t = np.asarray(qw.table.astype(jnp.float32), np.float64)
    s = np.repeat(np.asarray(qw.scales.astype(jnp.float32)), 32, axis=0)
    u = (np.asarray(w, np.float32) / s).astype(np.float64)
    codes = np.asarray(fj.unpack(qw.codes, bits, (k, n)))
    best = np.min(np.abs(u[..., None] - t), axis=-1)
    np.testing.assert_array_equal(np.abs(u - t[codes]), best)


def test_nearest_codes_matches_argmin_and_quantize(rng):
    table = jnp.asarray(rng.permutation(fj.tables.nf(4)), jnp.float32)  # unsorted on purpose
    u = jnp.asarray(rng.uniform(-1.2, 1.2, (50, 7)), jnp.float32)
    codes = np.asarray(nearest_codes(u, table))
    t = np.asarray(table)
    np.testing.assert_array_equal(t[codes], t[np.argmin(np.abs(np.asarray(u)[..., None] - t), axis=-1)])
    # With zero steps calibrate returns exactly flute_jax.quantize's weight.
    w = rng.standard_normal((64, 20))
    qw, rep = calibrate_kernel(w, rng.standard_normal((8, 64)), bits=4, group_size=32, steps=0, progress=False)
    ref = fj.quantize(w, 4, 32, "nf", jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not rep.learned and rep.final_error == rep.start_error


def test_keeps_start_when_learning_does_not_beat_it(rng):
    # An absurd learning rate wrecks every iterate after the first (which is the NF start):
    # calibrate must hand back the NF quantization itself.
    k, n = 64, 16
    w = rng.standard_normal((k, n))
    x = rng.standard_normal((32, k))
    qw, rep = calibrate_kernel(w, x, bits=4, group_size=32, steps=3, learning_rate=50.0, progress=False)
    assert not rep.learned and rep.final_error == rep.start_error
    ref = fj.quantize(w, 4, 32, "nf", jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(48, name="up")(x)
        return nn.Dense(24, name="down")(nn.gelu(h))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(32, name="proj")(x), None


def test_calibrate_param_tree_with_stacked_layers(rng):
    k = 32
    x = jnp.asarray(rng.standard_normal((64, k)), jnp.float32)
    mlp = _Mlp()
    mlp_params = mlp.init(jax.random.key(0), x)["params"]
    scanned = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    scan_params = scanned.init(jax.random.key(1), x, None)["params"]
    params = {"params": {"mlp": mlp_params, "stack": scan_params}}
    assert params["params"]["stack"]["proj"]["kernel"].shape == (3, k, 32)

    h = nn.gelu(x @ mlp_params["up"]["kernel"] + mlp_params["up"]["bias"])
    stack_in = jnp.asarray(rng.standard_normal((3, 40, k)), jnp.float32)
    acts = {
        "mlp/up": x,  # relative to the "params" collection, flat key
        "params": {"mlp": {"down": {"kernel": h}}, "stack": {"proj": stack_in}},  # nested keys
    }
    out, reports = calibrate(params, acts, bits=4, group_size=32, steps=10, progress=False, return_report=True)
    assert sorted(reports) == [
        "params/mlp/down", "params/mlp/up", "params/stack/proj[0]", "params/stack/proj[1]", "params/stack/proj[2]"
    ]
    for rep in reports.values():
        assert rep.final_error <= rep.start_error
    up = out["params"]["mlp"]["up"]["kernel"]
    assert isinstance(up, fj.QuantizedWeight) and up.shape == (k, 48)
    np.testing.assert_array_equal(out["params"]["mlp"]["up"]["bias"], mlp_params["up"]["bias"])
    stacked = out["params"]["stack"]["proj"]["kernel"]
    assert stacked.shape == (k, 32) and stacked.scales.shape == (3, 1, 32)
    for layer in range(3):
        qw = jax.tree.map(lambda leaf: leaf[layer], stacked).validate()
        w = scan_params["proj"]["kernel"][layer]
        assert output_error(stack_in[layer], w, fj.dequantize(qw, jnp.float32)) == pytest.approx(
            reports[f"params/stack/proj[{layer}]"].final_error, rel=1e-6
        )
    # The calibrated kernel runs through qgemm.
    y = fj.qgemm(x, up)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), np.asarray(x, np.float64) @ np.asarray(fj.dequantize(up, jnp.float32), np.float64),
        rtol=2e-2, atol=2e-2,
    )


def test_bad_inputs(rng):
    w = rng.standard_normal((64, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        calibrate_kernel(w, rng.standard_normal((4, 63)), progress=False)
    with pytest.raises(ValueError, match="steps"):
        calibrate_kernel(w, rng.standard_normal((4, 64)), steps=-1, progress=False)
    with pytest.raises(ValueError, match="bits"):
        calibrate_kernel(w, rng.standard_normal((4, 64)), bits=5, progress=False)
    with pytest.raises(TypeError, match="float"):
        calibrate_kernel(w, np.ones((4, 64), np.int32), progress=False)
    with pytest.raises(ValueError, match="finite"):
        calibrate_kernel(w, np.full((4, 64), np.nan), progress=False)
    params = {"a": {"kernel": w}, "s": {"kernel": rng.standard_normal((2, 64, 8))}}
    with pytest.raises(ValueError, match="match no 'kernel'"):
        calibrate(params, {"b": rng.standard_normal((4, 64))}, progress=False)
    with pytest.raises(ValueError, match="one batch per layer"):
        calibrate(params, {"s": rng.standard_normal((3, 4, 64))}, progress=False)
    with pytest.raises(TypeError, match="mapping"):
        calibrate(params, [1, 2], progress=False)
