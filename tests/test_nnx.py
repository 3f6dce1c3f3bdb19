"""flute_jax.nn FluteLinear and quantize_model (flax.nnx)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, reference_qgemm, rel_error
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

import flute_jax as fj
from flute_jax import nn as fnn


def _x(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def test_flute_linear_init_matches_linear(rng):
    seed = int(rng.integers(1 << 30))
    binit = nnx.initializers.normal(0.3)
    linear = nnx.Linear(300, 40, bias_init=binit, rngs=nnx.Rngs(seed))
    flute = fnn.FluteLinear(300, 40, bias_init=binit, bits=3, group_size=128, table="int", rngs=nnx.Rngs(seed))
    expected = fj.quantize(linear.kernel[...], bits=3, group_size=128, table="int", dtype=jnp.float32)
    for name in ("codes", "scales", "table"):
        np.testing.assert_array_equal(getattr(flute.kernel, name), getattr(expected, name))
    np.testing.assert_array_equal(flute.bias[...], linear.bias[...])
    x = _x(rng, 2, 5, 300)
    y = nnx.jit(lambda m, x: m(x))(flute, x)
    ref = reference_qgemm(x.reshape(-1, 300), flute.kernel).reshape(2, 5, 40) + np.asarray(linear.bias[...], np.float64)
    assert y.shape == (2, 5, 40) and rel_error(y, ref) < TOLERANCE["float32"]


class Net(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(200, 64, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 48, use_bias=False, rngs=rngs)])
        self.head = nnx.Linear(48, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.inp(x))
        for block in self.blocks:
            x = jax.nn.relu(block(x))
        return self.head(x)


def _reference(layers, x):
    h = np.asarray(x, np.float64)
    for i, (qw, b) in enumerate(layers):
        h = reference_qgemm(h, qw) if isinstance(qw, fj.QuantizedWeight) else h @ np.asarray(qw, np.float64)
        h = h + (np.asarray(b, np.float64) if b is not None else 0)
        h = np.maximum(h, 0) if i < len(layers) - 1 else h
    return h


def test_quantize_model_in_place(rng):
    model = Net(nnx.Rngs(int(rng.integers(1 << 30))))
    x = _x(rng, 7, 200)
    dense_out = model(x)
    head_kernel = model.head.kernel[...]
    paths = fnn.quantize_model(model, bits=4, group_size=32, where=lambda path, layer: path[0] != "head")
    assert paths == [("blocks", 0), ("blocks", 1), ("inp",)]
    assert isinstance(model.inp, fnn.FluteLinear) and isinstance(model.blocks[1], fnn.FluteLinear)
    assert isinstance(model.head, nnx.Linear)
    assert model.blocks[1].bias is None
    y = model(x)
    layers = [(model.inp.kernel, model.inp.bias[...]), (model.blocks[0].kernel, model.blocks[0].bias[...]),
              (model.blocks[1].kernel, None), (head_kernel, model.head.bias[...])]
    assert rel_error(y, _reference(layers, x)) < 1e-5
    assert 0 < rel_error(y, np.asarray(dense_out, np.float64)) < 0.3  # it did quantize, and approximates
    # the state holds packed arrays; static metadata lives in the graphdef
    state = nnx.state(model, nnx.Param)
    assert state["inp"]["codes"][...].dtype == jnp.uint32
    graphdef, params = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, params)(x), y)


def test_regex_where_and_dtype(rng):
    model = Net(nnx.Rngs(0))
    assert fnn.quantize_model(model, where=r"^blocks", dtype=jnp.bfloat16) == [("blocks", 0), ("blocks", 1)]
    assert model.blocks[0].kernel.dtype == jnp.bfloat16 and isinstance(model.inp, nnx.Linear)
    with pytest.raises(TypeError, match="nnx.Module"):
        fnn.quantize_model({"a": 1})


def test_sharding_metadata_follows_the_leaves(rng):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
        linear = nnx.Linear(512, 128, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("data", "model")})
        flute = fnn.FluteLinear.from_linear(linear, group_size=64)
        specs = nnx.get_partition_spec(nnx.state(flute, nnx.Param))
    spec = lambda v: v.get_value() if hasattr(v, "get_value") else v.value  # noqa: E731
    assert spec(specs["codes"]) == P("data", "model", None)
    assert spec(specs["scales"]) == P("data", "model")
    assert spec(specs["table"]) == P(None)
    assert flute.codes[...].sharding.spec == P("data", "model", None)
    x = _x(rng, 4, 512)
    ref = reference_qgemm(x, flute.kernel) + np.asarray(flute.bias[...], np.float64)
    assert rel_error(nnx.jit(lambda m, x: m(x))(flute, x), ref) < TOLERANCE["float32"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="rngs"):
        fnn.FluteLinear(16, 16)
    with pytest.raises(ValueError, match="in_features"):
        fnn.FluteLinear(0, 16, rngs=nnx.Rngs(0))
    qw = fj.quantize(jnp.ones((32, 16)), bits=4, group_size=32)
    with pytest.raises(ValueError, match="shape"):
        fnn.FluteLinear(16, 32, weight=qw, use_bias=False, group_size=32)
    with pytest.raises(TypeError, match="nnx.Linear"):
        fnn.FluteLinear.from_linear(object())
