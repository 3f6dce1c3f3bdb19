"""Orbax checkpoints of quantized params: a real checkpoint on disk, static metadata, sharded restore."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh

import flute_jax as fj
from flute_jax import nn as fnn


def _params(rng):
    w = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "embed": w(50, 272),
        "layer": {
            "up": {"kernel": fj.quantize(w(272, 96), bits=3, group_size=-1, table="int", dtype=jnp.bfloat16),
                   "bias": w(96)},
            "down": {"kernel": fj.quantize(w(96, 272), bits=4, group_size=32, table="nf", dtype=jnp.float16)},
        },
        "stacked": {"kernel": fnn.quantize_params({"k": {"kernel": w(3, 512, 64)}})["k"]["kernel"]},
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_without_target(rng, tmp_path):
    params = _params(rng)
    fnn.save(tmp_path / "ckpt", params)
    assert (tmp_path / "ckpt" / "params").is_dir() and (tmp_path / "ckpt" / "flute").is_dir()
    meta = fnn.checkpoint_metadata(tmp_path / "ckpt")["quantized"]
    assert meta["layer/up/kernel"] == {"bits": 3, "group_size": -1, "shape": [272, 96]}
    assert meta["stacked/kernel"] == {"bits": 4, "group_size": 64, "shape": [512, 64]}
    restored = fnn.restore(tmp_path / "ckpt")
    _assert_same(restored, params)  # QuantizedWeight nodes, static fields included, come back
    x = jnp.asarray(rng.standard_normal((3, 272)), jnp.bfloat16)
    np.testing.assert_array_equal(fj.qgemm(x, restored["layer"]["up"]["kernel"]), fj.qgemm(x, params["layer"]["up"]["kernel"]))
    with pytest.raises(ValueError):
        fnn.save(tmp_path / "ckpt", params)  # exists
    fnn.save(tmp_path / "ckpt", {"a": jnp.ones(3)}, force=True)
    assert fnn.checkpoint_metadata(tmp_path / "ckpt")["quantized"] == {}


def test_boxed_linen_params_restore_into_model(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.float32)
    layer = fnn.FluteDense(128, kernel_axes=("embed", "mlp"), group_size=128)
    variables = layer.init(jax.random.key(int(rng.integers(1 << 30))), x)
    fnn.save(tmp_path / "c", variables["params"])
    restored = fnn.restore(tmp_path / "c")
    np.testing.assert_array_equal(layer.apply({"params": restored}, x), layer.apply(variables, x))


def test_sharded_restore_puts_each_shard_on_its_device(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((4, 1024)), jnp.float32)
    layer = fnn.FluteDense(256, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))
    variables = layer.init(jax.random.key(7), x)
    params = nn.meta.unbox(variables)["params"]
    fnn.save(tmp_path / "c", params)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rules = (("embed", "data"), ("mlp", "model"))
    abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)["params"]
    restored = fnn.restore(tmp_path / "c", shardings=shardings)
    codes, scales = restored["kernel"].codes, restored["kernel"].scales
    assert codes.sharding == shardings["kernel"].codes and len(codes.addressable_shards) == 8
    full_codes, full_scales = np.asarray(params["kernel"].codes), np.asarray(params["kernel"].scales)
    for shard in codes.addressable_shards:
        assert shard.data.shape == (2, 4, 512) and shard.data.devices() == {shard.device}
        np.testing.assert_array_equal(shard.data, full_codes[shard.index])
    for shard in scales.addressable_shards:
        assert shard.data.shape == (8, 64)
        np.testing.assert_array_equal(shard.data, full_scales[shard.index])
    y = jax.jit(layer.apply)({"params": restored}, x)
    np.testing.assert_allclose(y, layer.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
    # one sharding for everything: replicated on the mesh
    replicated = fnn.restore(tmp_path / "c", shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert len(replicated["kernel"].table.addressable_shards) == 8
    with pytest.raises(ValueError, match="shardings"):
        fnn.restore(tmp_path / "c", shardings={"kernel": shardings["kernel"]})


def test_nnx_state_roundtrip(rng, tmp_path):
    model = nnx.Sequential(nnx.Linear(300, 64, rngs=nnx.Rngs(1)), nnx.Linear(64, 32, rngs=nnx.Rngs(2)))
    fnn.quantize_model(model, bits=2, group_size=64, table="nf")
    fnn.save(tmp_path / "c", nnx.state(model, nnx.Param))
    # a fresh model of the same architecture, abstract (no init compute), filled from disk
    def build():
        fresh = nnx.Sequential(nnx.Linear(300, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
        fnn.quantize_model(fresh, bits=2, group_size=64, table="nf")
        return fresh
    graphdef, state = nnx.split(nnx.eval_shape(build))
    nnx.replace_by_pure_dict(state, fnn.restore(tmp_path / "c"))
    restored = nnx.merge(graphdef, state)
    x = jnp.asarray(rng.standard_normal((5, 300)), jnp.float32)
    np.testing.assert_array_equal(restored(x), model(x))


def test_not_a_flute_checkpoint(tmp_path):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(tmp_path / "other", args=ocp.args.Composite(flute=ocp.args.JsonSave({"format": "x"})))
    with pytest.raises(ValueError, match="not a flute_jax checkpoint"):
        fnn.restore(tmp_path / "other")


def test_version_1_checkpoint_restores_converted(rng, tmp_path, monkeypatch):
    # A checkpoint written under layout version 1 (before the 3-bit high plane moved) comes
    # back in the current layout: same codes, same qgemm; 2- and 4-bit codes are untouched.
    from flute_jax import layout
    from flute_jax.nn import checkpoint
    from test_format import pack_version_1

    params = _params(rng)
    up = params["layer"]["up"]["kernel"]
    codes = np.asarray(fj.unpack(up.codes, 3, up.shape))
    old = dict(params, layer=dict(params["layer"], up=dict(params["layer"]["up"], kernel=fj.QuantizedWeight(
        codes=jnp.asarray(pack_version_1(codes, 3)), scales=up.scales, table=up.table, bits=3,
        group_size=up.group_size, shape=up.shape))))
    assert not np.array_equal(np.asarray(old["layer"]["up"]["kernel"].codes), np.asarray(up.codes))
    monkeypatch.setattr(checkpoint, "FORMAT", "flute_jax.quantized_params/1")
    fnn.save(tmp_path / "v1", old)
    monkeypatch.undo()
    assert fnn.checkpoint_metadata(tmp_path / "v1")["format"] == "flute_jax.quantized_params/1"
    _assert_same(fnn.restore(tmp_path / "v1"), params)
    assert checkpoint.FORMAT == f"flute_jax.quantized_params/{layout.LAYOUT_VERSION}"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(tmp_path / "future", args=ocp.args.Composite(
            flute=ocp.args.JsonSave({"format": "flute_jax.quantized_params/99", "quantized": {}})))
    with pytest.raises(ValueError, match="not a flute_jax checkpoint this version reads"):
        fnn.restore(tmp_path / "future")
