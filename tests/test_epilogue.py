"""qgemm's fused SwiGLU epilogue (``epilogue="swiglu"``) on CPU: the float64 reference, the
unfused composition, bad input, NaN/Inf, vmap, autodiff, sharding on 8 simulated CPU devices
and the Flax layers. (The CUDA kernels: tests/test_gpu_epilogue.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, reference_qgemm, rel_error
from jax.sharding import NamedSharding
from jax.test_util import check_grads
from jax.sharding import PartitionSpec as P
from qgemm_checks import check_swiglu, random_weight, reference_swiglu

import flute_jax as fj
from flute_jax import epilogue as E
from flute_jax.primitive import qgemm_p

CPU = jax.devices("cpu")[0]


def swiglu(x, qw):
    return fj.qgemm(x, qw, epilogue="swiglu")


def unfused(x, qw):
    """The same layer unfused: qgemm, then the epilogue on its float32 result."""
    return E.apply(fj.qgemm(x.astype(jnp.float32), fj.QuantizedWeight(
        qw.codes, qw.scales.astype(jnp.float32), qw.table.astype(jnp.float32), qw.bits, qw.group_size, qw.shape)),
        "swiglu")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("k,n,lead,group_size", [
    (300, 48, (5,), 64),  # K past a packed block, three 16-column pairs of blocks
    (256, 16, (1,), -1),  # one N-block, one group
    (700, 208, (2, 3), 32),  # leading axes
])
def test_matches_reference(rng, bits, dtype, k, n, lead, group_size):
    check_swiglu(rng, CPU, k, n, lead, bits, group_size, dtype)


def test_interleave_gate_up_round_trip(rng):
    gate, up = rng.standard_normal((2, 3, 40, 24)).astype(np.float32)
    w = E.interleave_gate_up(gate, up)
    assert w.shape == (3, 40, 48)
    np.testing.assert_array_equal(np.asarray(w[..., :8]), gate[..., :8])
    np.testing.assert_array_equal(np.asarray(w[..., 8:16]), up[..., :8])
    np.testing.assert_array_equal(np.asarray(w[..., 16:24]), gate[..., 8:16])
    g2, u2 = E.split_gate_up(w)
    np.testing.assert_array_equal(np.asarray(g2), gate)
    np.testing.assert_array_equal(np.asarray(u2), up)
    with pytest.raises(ValueError, match="multiple of 8"):
        E.interleave_gate_up(gate[..., :12], up[..., :12])
    with pytest.raises(ValueError, match="one shape"):
        E.interleave_gate_up(gate, up[..., :16])


def test_quantized_gate_up_layer(rng):
    # Dense gate and up, interleaved, quantized once: the fused layer is silu(x @ g_hat) * (x @ u_hat).
    k, i = 512, 64
    gate, up = rng.standard_normal((2, k, i)).astype(np.float32)
    qw = fj.quantize(E.interleave_gate_up(gate, up), bits=4, group_size=128, dtype=jnp.float32)
    g_hat, u_hat = (np.asarray(v, np.float64) for v in E.split_gate_up(fj.dequantize(qw)))
    x = rng.standard_normal((3, k)).astype(np.float32)
    a, b = x.astype(np.float64) @ g_hat, x.astype(np.float64) @ u_hat
    ref = a / (1 + np.exp(-a)) * b
    assert rel_error(np.asarray(swiglu(jnp.asarray(x), qw)), ref) <= TOLERANCE["float32"]


def test_equals_unfused_composition(rng):
    qw = random_weight(rng, 333, 64, 4, 64, jnp.float32)
    x = jnp.asarray(rng.standard_normal((7, 333)), jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(swiglu)(x, qw)), np.asarray(unfused(x, qw)), rtol=2e-6, atol=1e-6)


def test_rejects_bad_epilogue_and_width(rng):
    qw = random_weight(rng, 64, 40, 4, 32, jnp.float32)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="epilogue must be None or one of"):
        fj.qgemm(x, qw, epilogue="gelu")
    with pytest.raises(ValueError, match="multiple of 16"):
        fj.qgemm(x, qw, epilogue="swiglu")
    # The C++ handler re-checks what the Python side let through (a hand-bound primitive).
    with pytest.raises(Exception, match="flute_qgemm: the swiglu epilogue needs N a multiple of 16"):
        jax.block_until_ready(qgemm_p.bind(x, qw.codes, qw.scales, qw.table, bits=4, group_size=32, epilogue="swiglu"))


def test_nan_and_inf_propagate_as_unfused(rng):
    qw = random_weight(rng, 64, 32, 4, 32, jnp.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[0, 3], x[1, 10], x[2, 5] = np.nan, np.inf, -np.inf
    x = jnp.asarray(x)
    y, ref = np.asarray(swiglu(x, qw)), np.asarray(unfused(x, qw))
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(y), test(ref))
    assert np.isnan(y[0]).all() and np.isfinite(y[3]).all()


def test_vmap_over_x_and_over_weights(rng):
    qw = random_weight(rng, 100, 32, 3, 32, jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 2, 100)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda v: swiglu(v, qw))(x)), np.asarray(swiglu(x, qw)))
    qws = [random_weight(rng, 100, 32, 3, 32, jnp.float32) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qws)
    y = jax.vmap(swiglu)(x, stacked)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(swiglu(x[i], qws[i])))


def test_gradients_match_unfused(rng):
    qw = random_weight(rng, 96, 32, 4, 32, jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)

    def loss(f):
        return lambda x, scales, table: jnp.sum(f(x, fj.QuantizedWeight(
            qw.codes, scales, table, qw.bits, qw.group_size, qw.shape)) * ct)

    fused = jax.grad(loss(swiglu), argnums=(0, 1, 2))(x, qw.scales, qw.table)
    plain = jax.grad(loss(unfused), argnums=(0, 1, 2))(x, qw.scales, qw.table)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    # Forward mode on the fused op equals the unfused composition's.
    t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, d_fused = jax.jvp(lambda v: swiglu(v, qw), (x,), (t,))
    _, d_plain = jax.jvp(lambda v: unfused(v, qw), (x,), (t,))
    np.testing.assert_allclose(np.asarray(d_fused), np.asarray(d_plain), rtol=1e-5, atol=1e-5)
    check_grads(lambda v: swiglu(v, qw), (x,), order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-2)


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices("cpu")[:8])


@pytest.mark.parametrize("k,n,x_spec,k_axis,n_axis", [
    (512, 256, P("data"), None, "model"),  # column parallel: each device a slice of I
    (2048, 128, P("data", "model"), "model", None),  # row parallel: psum of float32 partials, then the epilogue
    (512, 64, P("data"), None, None),  # batch only
])
def test_sharded_equals_single_device(rng, k, n, x_spec, k_axis, n_axis):
    mesh = _mesh()
    qw = random_weight(rng, k, n, 4, 64, jnp.float32)
    x = jnp.asarray(rng.standard_normal((8, k)), jnp.float32)
    ref = np.asarray(jax.jit(swiglu)(jax.device_put(x, CPU), jax.device_put(qw, CPU)))
    specs = fj.shard_specs(qw, k_axis, n_axis, mesh=mesh)
    qws = jax.device_put(qw, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    f = jax.jit(swiglu)
    y = f(xs, qws)
    text = f.lower(xs, qws).compile().as_text()
    assert text.count(" all-gather(") == 0 and text.count(" all-to-all(") == 0
    assert (text.count(" all-reduce(") > 0) == (k_axis is not None)
    if n_axis is not None:
        assert y.sharding.spec[-1] == n_axis  # y's I sharded like the weight's N
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("k_axis,n_axis", [("model", None), (None, "model")])
def test_sharded_under_set_mesh(rng, k_axis, n_axis):
    # jax.set_mesh of an Explicit mesh (jax.make_mesh's default in new JAX): the partition's
    # local program (all-reduce, then the epilogue) must not carry typed-sharding ops.
    mesh = _mesh()
    qw = random_weight(rng, 2048, 256, 4, 128, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((8, 2048)), jnp.bfloat16)
    ref = np.asarray(jax.jit(swiglu)(jax.device_put(x, CPU), jax.device_put(qw, CPU)), np.float32)
    with jax.set_mesh(mesh):
        qws = jax.device_put(qw, jax.tree.map(lambda s: NamedSharding(mesh, s), fj.shard_specs(qw, k_axis, n_axis)))
        xs = jax.device_put(x, NamedSharding(mesh, P(None, k_axis)))
        y = np.asarray(jax.jit(swiglu)(xs, qws), np.float32)
    assert rel_error(y, ref) <= TOLERANCE["bfloat16"]


def test_dense_path_matches_kernel(rng):
    from flute_jax import dense
    qw = random_weight(rng, 300, 48, 4, 64, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((6, 300)), jnp.bfloat16)
    y = dense.dense_qgemm(x, qw.codes, qw.scales, qw.table, bits=4, group_size=64, cuda=False, epilogue="swiglu")
    ref = reference_swiglu(np.asarray(x), qw)
    assert y.shape == (6, 24) and rel_error(np.asarray(y), ref) <= TOLERANCE["bfloat16"]


def test_flax_layers(rng):
    import flax.linen as nn
    from flax import nnx

    import flute_jax.nn as fnn

    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    layer = fnn.FluteDense(features=96, use_bias=False, epilogue="swiglu", group_size=32)
    params = layer.init(jax.random.key(0), x)
    y = layer.apply(params, x)
    qw = params["params"]["kernel"]
    assert y.shape == (2, 3, 48)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(swiglu(x, qw)))
    with pytest.raises(ValueError, match="no bias"):
        fnn.FluteDense(features=96, epilogue="swiglu").init(jax.random.key(0), x)
    lin = fnn.FluteLinear(64, 96, use_bias=False, epilogue="swiglu", group_size=32, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(swiglu(x, lin.kernel)))
    with pytest.raises(ValueError, match="no bias"):
        fnn.FluteLinear(64, 96, epilogue="swiglu", rngs=nnx.Rngs(0))
    del nn
