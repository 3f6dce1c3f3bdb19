"""flute_jax.nn linen layer and quantize_params: against flax.linen.Dense and float64 references."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, reference_qgemm, rel_error
from jax.sharding import Mesh, NamedSharding

import flute_jax as fj
from flute_jax import nn as fnn

KINIT = nn.initializers.lecun_normal()


def _x(rng, *shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("bits,group_size,table", [(4, 64, "nf"), (3, -1, "int"), (2, 128, "fp")])
def test_init_quantizes_the_dense_kernel(rng, bits, group_size, table):
    k, n = 300, 40  # neither a multiple of the 256 x 16 unit
    x = _x(rng, 2, 3, k)
    key = jax.random.key(int(rng.integers(1 << 30)))
    binit = nn.initializers.normal(0.5)
    dense = nn.Dense(n, bias_init=binit)
    flute = fnn.FluteDense(n, bias_init=binit, bits=bits, group_size=group_size, table=table)
    dparams = dense.init(key, x)["params"]
    fparams = flute.init(key, x)["params"]
    expected = fj.quantize(dparams["kernel"], bits=bits, group_size=group_size, table=table, dtype=jnp.float32)
    qw = fparams["kernel"]
    assert (qw.bits, qw.group_size, qw.shape) == (bits, group_size, (k, n))
    for name in ("codes", "scales", "table"):
        np.testing.assert_array_equal(getattr(qw, name), getattr(expected, name))
    np.testing.assert_array_equal(fparams["bias"], dparams["bias"])
    y = flute.apply({"params": fparams}, x)
    assert y.shape == (2, 3, n) and y.dtype == jnp.float32
    ref = reference_qgemm(x.reshape(-1, k), qw).reshape(2, 3, n) + np.asarray(dparams["bias"], np.float64)
    assert rel_error(y, ref) < TOLERANCE["float32"]
    # and it is an approximation of the dense layer it replaces (loose: quantization error)
    assert rel_error(y, np.asarray(dense.apply({"params": dparams}, x), np.float64)) < {4: 0.2, 3: 0.35, 2: 0.8}[bits]


def test_dtypes_follow_dense_rules(rng):
    x = _x(rng, 5, 64, dtype=jnp.bfloat16)
    layer = fnn.FluteDense(32, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, use_bias=False)
    params = layer.init(jax.random.key(0), x)["params"]
    assert set(params) == {"kernel"} and params["kernel"].dtype == jnp.bfloat16
    y = layer.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    assert rel_error(y, reference_qgemm(x, params["kernel"])) < TOLERANCE["bfloat16"]
    # dtype=None: promotion of a bfloat16 input with float32 params computes in float32, like Dense
    wide = fnn.FluteDense(32)
    assert wide.apply(wide.init(jax.random.key(1), x), x).dtype == jnp.float32


def test_partition_annotations_per_leaf(rng):
    x = _x(rng, 4, 512)
    init = nn.with_logical_partitioning(KINIT, ("embed", "mlp"))
    for group_size, scale_k in ((64, "embed"), (-1, None)):
        layer = fnn.FluteDense(64, kernel_init=init, group_size=group_size)
        specs = nn.get_partition_spec(jax.eval_shape(layer.init, jax.random.key(0), x))["params"]["kernel"]
        assert specs.codes == jax.sharding.PartitionSpec("embed", "mlp", None)
        assert specs.scales == jax.sharding.PartitionSpec(scale_k, "mlp")
        assert specs.table == jax.sharding.PartitionSpec(None)
    # kernel_axes gives the same annotations without a boxed kernel_init
    plain = fnn.FluteDense(64, kernel_axes=("embed", "mlp"))
    boxed = fnn.FluteDense(64, kernel_init=init)
    assert nn.get_partition_spec(jax.eval_shape(plain.init, jax.random.key(0), x)) == nn.get_partition_spec(
        jax.eval_shape(boxed.init, jax.random.key(0), x)
    )


def test_sharded_params_under_jit(rng):
    """Params placed by their logical annotations on a 2 x 4 mesh give the unsharded result."""
    x = _x(rng, 8, 512)
    layer = fnn.FluteDense(128, kernel_init=nn.with_logical_partitioning(KINIT, ("embed", "mlp")))
    boxed = layer.init(jax.random.key(3), x)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rules = (("embed", "data"), ("mlp", "model"))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.device_put(nn.meta.unbox(boxed), shardings)
    codes_shard = params["params"]["kernel"].codes.addressable_shards[0].data
    assert codes_shard.shape == (1, 2, 512)  # 2 K-blocks over 'data', 8 N-blocks over 'model'
    y = jax.jit(layer.apply, out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec()))(params, x)
    # a K split may sum partial products in another order: equal up to float32 rounding
    single = layer.apply(nn.meta.unbox(boxed), x)
    assert rel_error(y, np.asarray(single, np.float64)) < 1e-6


class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        h = nn.relu(self.dense(96, name="up")(x))
        h = self.dense(80, name="gate", use_bias=False)(h) * h[..., :80]
        return self.dense(48, name="down")(h)


def _dense_mlp_reference(params, x, qparams):
    """float64 forward with every quantized layer's W_hat (reference_qgemm) and float biases."""
    def layer(name, h):
        y = reference_qgemm(h, qparams[name]["kernel"]) if isinstance(qparams[name]["kernel"], fj.QuantizedWeight) else (
            np.asarray(h, np.float64) @ np.asarray(params[name]["kernel"], np.float64)
        )
        return y + np.asarray(params[name]["bias"], np.float64) if "bias" in params[name] else y

    h = np.maximum(layer("up", np.asarray(x, np.float64)), 0)
    h = layer("gate", h) * h[..., :80]
    return layer("down", h)


def test_quantize_params_then_swap_dense_for_flute(rng):
    x = _x(rng, 6, 200)
    dense_params = MLP().init(jax.random.key(5), x)["params"]
    dense_params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), dense_params)
    q = fnn.quantize_params(dense_params, bits=4, group_size=32, table="nf")
    assert fnn.quantized_paths(q) == [("down", "kernel"), ("gate", "kernel"), ("up", "kernel")]
    model = MLP(dense=lambda *a, **kw: fnn.FluteDense(*a, group_size=32, **kw))
    assert jax.tree.structure(q) == jax.tree.structure(model.init(jax.random.key(0), x)["params"])
    y = model.apply({"params": q}, x)
    # float32 kernel with float32 activations: the whole MLP agrees with float64 to ~1e-6
    assert rel_error(y, _dense_mlp_reference(dense_params, x, q)) < 1e-5
    # the full variables dict is accepted too
    assert fnn.quantized_paths(fnn.quantize_params({"params": dense_params})) == [
        ("params",) + p for p in fnn.quantized_paths(q)
    ]


def test_quantize_params_where(rng):
    x = _x(rng, 2, 64)
    params = MLP().init(jax.random.key(1), x)["params"]
    only_up = fnn.quantize_params(params, where="up|down")
    assert isinstance(only_up["up"]["kernel"], fj.QuantizedWeight)
    assert not isinstance(only_up["gate"]["kernel"], fj.QuantizedWeight)
    by_fn = fnn.quantize_params(params, where=lambda path, kernel: kernel.shape[1] == 80)
    assert fnn.quantized_paths(by_fn) == [("gate", "kernel")]
    np.testing.assert_array_equal(by_fn["up"]["kernel"], params["up"]["kernel"])
    # bfloat16 storage when asked
    assert fnn.quantize_params(params, dtype=jnp.bfloat16)["up"]["kernel"].dtype == jnp.bfloat16


class Block(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x, _):
        k = nn.with_logical_partitioning(KINIT, ("embed", "mlp"))
        return x + jnp.tanh(self.dense(x.shape[-1], kernel_init=k, name="proj")(x)), None


def _stack(dense):
    return nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=3,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(dense=dense)


def test_stacked_layers(rng):
    """nn.scan'ed Dense params [L, K, N] convert layer by layer and match a scanned FluteDense."""
    x = _x(rng, 4, 272)
    dense_vars = _stack(nn.Dense).init(jax.random.key(2), x, None)
    q = fnn.quantize_params(dense_vars, group_size=64)
    flute = _stack(lambda *a, **kw: fnn.FluteDense(*a, group_size=64, **kw))
    flute_vars = flute.init(jax.random.key(2), x, None)
    assert jax.tree.structure(q) == jax.tree.structure(flute_vars)
    assert nn.get_partition_spec(q) == nn.get_partition_spec(flute_vars)
    qw = nn.meta.unbox(q)["params"]["proj"]["kernel"]
    assert qw.codes.shape == (3, 2, 17, 512) and qw.scales.shape == (3, 5, 272)
    assert nn.get_partition_spec(q)["params"]["proj"]["kernel"].codes == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp", None
    )
    y, _ = flute.apply(nn.meta.unbox(q), x, None)
    # reference: each layer quantized on its own, float64 forward
    kernels = nn.meta.unbox(dense_vars)["params"]["proj"]
    h = np.asarray(x, np.float64)
    for layer in range(3):
        w = fj.quantize(kernels["kernel"][layer], bits=4, group_size=64, table="nf", dtype=jnp.float32)
        h = h + np.tanh(reference_qgemm(h, w) + np.asarray(kernels["bias"][layer], np.float64))
    assert rel_error(y, h) < 1e-5


def test_bad_params_and_fields(rng):
    x = _x(rng, 2, 64)
    layer = fnn.FluteDense(16, bits=4)
    params = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="bits=3"):
        fnn.FluteDense(16, bits=4).apply(fnn.quantize_params(nn.Dense(16).init(jax.random.key(0), x), bits=3), x)
    with pytest.raises(TypeError, match="quantize_params"):
        layer.apply(nn.Dense(16).init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match="shape"):
        layer.apply(params, _x(rng, 2, 65))
    with pytest.raises(ValueError, match="features"):
        fnn.FluteDense(0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="group_size"):
        fnn.FluteDense(16, group_size=48).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fnn.quantize_params({"a": {"kernel": jnp.ones((4, 4), jnp.int32)}})
    with pytest.raises(TypeError, match="where"):
        fnn.quantize_params({"a": {"kernel": jnp.ones((4, 4))}}, where=3)


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout."""
    # `python -c` puts the working directory first on sys.path: run it from tests/ so it
    # imports the installed package, not the repository's uncompiled source tree.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_nn_is_imported_lazily():
    # A bare `import flute_jax` leaves flax alone; flute_jax.nn works without importing it first.
    out = _fresh_python(
        "import sys, flute_jax as fj\n"
        "print('flax' in sys.modules, 'flute_jax.nn' in sys.modules)\n"
        "print(fj.nn.FluteDense.__module__, fj.nn is sys.modules['flute_jax.nn'], 'flax' in sys.modules)\n"
        "print(hasattr(fj, 'no_such_name'))\n"
    )
    assert out.split() == ["False", "False", "flute_jax.nn.linen", "True", "True", "False"]
