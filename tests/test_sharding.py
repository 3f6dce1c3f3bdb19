"""Sharded qgemm on 8 simulated CPU devices (conftest sets XLA_FLAGS).

For every rule: the numbers equal the unsharded result, the output has the
expected sharding, and the compiled HLO moves no weights (no all-gather,
all-to-all or collective-permute at all) and all-reduces only when K is sharded.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, reference_qgemm, rel_error
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flute_jax as fj

MOVES_DATA = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _cpu(tree):
    """Unsharded references run on the same (CPU) backend as the sharded programs."""
    return jax.device_put(tree, jax.devices("cpu")[0])


def _mesh(shape, names, **kw):
    # The 8 simulated CPU devices, also on a GPU machine (one GPU there).
    return jax.make_mesh(shape, names, devices=jax.devices("cpu")[: int(np.prod(shape))], **kw)


@pytest.fixture(scope="module")
def mesh():
    return _mesh((2, 4), ("data", "model"))


def _weight(rng, k, n, *, bits=4, group_size=64, dtype=jnp.float32):
    return fj.quantize(rng.standard_normal((k, n)).astype(np.float32), bits=bits, group_size=group_size, dtype=dtype)


def _put(mesh, tree, specs):
    return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def _collectives(compiled_text):
    return {op: compiled_text.count(f" {op}(") for op in (*MOVES_DATA, "all-reduce")}


def _assert_close(y, ref):
    # K-sharded sums add float32 partials in another order: equal up to float32 rounding.
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _run(mesh, x, qw, x_spec, k_axis=None, n_axis=None, out_spec=None):
    qws = _put(mesh, qw, fj.shard_specs(qw, k_axis, n_axis, mesh=mesh))
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    f = jax.jit(fj.qgemm, out_shardings=None if out_spec is None else NamedSharding(mesh, out_spec))
    lowered = f.lower(xs, qws)
    compiled = lowered.compile()
    return compiled(xs, qws), _collectives(compiled.as_text()), lowered.as_text()


def test_shardy_is_the_partitioner(rng, mesh):
    assert jax.config.jax_use_shardy_partitioner
    qw = _weight(rng, 256, 64)
    _, _, stablehlo = _run(mesh, jnp.ones((8, 256), jnp.float32), qw, P("data"), n_axis="model")
    # The op carries our Shardy rule (x's K is the compound factor of K-blocks).
    assert "sdy.sharding_rule" in stablehlo and "CustomSPMDPartitioning" in stablehlo


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_sharded(rng, mesh, dtype):
    qw = _weight(rng, 300, 40, dtype=dtype)  # odd K, N: weights stay replicated
    x = jnp.asarray(rng.standard_normal((16, 300)), dtype)
    y, ops, _ = _run(mesh, x, qw, P(("data", "model")))
    assert y.sharding.spec[0] in ("data", ("data", "model"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fj.qgemm(*_cpu((x, qw)))))
    assert not any(ops.values()), ops


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (2, -1)])
def test_column_parallel(rng, mesh, bits, group_size):
    qw = _weight(rng, 200, 64, bits=bits, group_size=group_size)  # N = 4 shards x 16
    x = jnp.asarray(rng.standard_normal((6, 200)), jnp.float32)
    y, ops, _ = _run(mesh, x, qw, P(), n_axis="model")
    assert tuple(y.sharding.spec) == (None, "model")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fj.qgemm(*_cpu((x, qw)))))
    assert not any(ops.values()), ops


@pytest.mark.parametrize("group_size,dtype", [(64, "float32"), (256, "float32"), (-1, "float32"), (128, "bfloat16")])
def test_row_parallel(rng, mesh, group_size, dtype):
    qw = _weight(rng, 1024, 24, group_size=group_size, dtype=dtype)  # 4 shards x 256 rows; N odd-sized
    x = jnp.asarray(rng.standard_normal((5, 1024)), dtype)
    y, ops, _ = _run(mesh, x, qw, P(None, "model"), k_axis="model")
    assert ops["all-reduce"] == 1 and not any(ops[o] for o in MOVES_DATA), ops
    ref = reference_qgemm(x, qw)
    unsharded = fj.qgemm(*_cpu((x, qw)))
    # float32 partial sums, one rounding: as accurate as the unsharded kernel.
    assert rel_error(y, ref) < TOLERANCE[dtype]
    assert rel_error(y, np.asarray(unsharded.astype(jnp.float32), np.float64)) < TOLERANCE[dtype]
    if dtype == "float32":
        _assert_close(y, unsharded)


def test_row_parallel_is_deterministic_and_replicated(rng, mesh):
    qw = _weight(rng, 2048, 32, group_size=128)
    x = jnp.asarray(rng.standard_normal((9, 2048)), jnp.bfloat16)
    qw = dataclasses.replace(qw, scales=qw.scales.astype(jnp.bfloat16), table=qw.table.astype(jnp.bfloat16))
    specs = fj.shard_specs(qw, k_axis="model", mesh=mesh)
    qws = _put(mesh, qw, specs)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "model")))
    f = jax.jit(fj.qgemm)
    first = f(xs, qws)
    shards = [np.asarray(s.data) for s in first.addressable_shards]
    for s in shards[1:]:  # every device holds the same bits
        np.testing.assert_array_equal(s, shards[0])
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(xs, qws)), np.asarray(first))


def test_2d_mesh_data_and_model(rng, mesh):
    qw = _weight(rng, 512, 64, group_size=32)
    x = jnp.asarray(rng.standard_normal((6, 512)), jnp.float32)
    # data x column parallel: y sharded on both, nothing communicated.
    y, ops, _ = _run(mesh, x, qw, P("data"), n_axis="model")
    assert tuple(y.sharding.spec) == ("data", "model")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fj.qgemm(*_cpu((x, qw)))))
    assert not any(ops.values()), ops
    # data x row parallel over a 2-device K split and column parallel N on the other axis.
    mesh2 = _mesh((2, 2, 2), ("data", "k", "n"))
    y, ops, _ = _run(mesh2, x, qw, P("data", "k"), k_axis="k", n_axis="n")
    assert tuple(y.sharding.spec) == ("data", "n")
    _assert_close(y, fj.qgemm(*_cpu((x, qw))))
    assert ops["all-reduce"] == 1 and not any(ops[o] for o in MOVES_DATA), ops


def test_replicated_weight_follows_output_sharding(rng, mesh):
    # Weights replicated, output requested N-sharded: each device uses its own
    # N-slice of the weight (a local slice, no communication).
    qw = _weight(rng, 256, 64)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    y, ops, _ = _run(mesh, x, qw, P(), out_spec=P(None, "model"))
    assert tuple(y.sharding.spec) == (None, "model")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fj.qgemm(*_cpu((x, qw)))))
    assert not ops["all-gather"] and not ops["all-reduce"], ops


def test_grad_with_sharded_weights(rng, mesh):
    qw = _weight(rng, 512, 64, group_size=64)
    x = jnp.asarray(rng.standard_normal((8, 512)), jnp.float32)
    qws = _put(mesh, qw, fj.shard_specs(qw, n_axis="model", mesh=mesh))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))

    def loss(x, scales, qw):
        return jnp.sum(jnp.tanh(fj.qgemm(x, dataclasses.replace(qw, scales=scales))))

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for a, b in zip(g(xs, qws.scales, qws), g(*_cpu((x, qw.scales, qw)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_scan_over_sharded_stacked_layers(rng, mesh):
    layers = [_weight(rng, 256, 256, group_size=64) for _ in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    specs = fj.shard_specs(stacked, n_axis="model", mesh=mesh)
    assert specs.codes == P(None, None, "model", None) and specs.scales == P(None, None, "model")
    sharded = _put(mesh, stacked, specs)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32) * 0.1

    def run(x, s, sharded=False):
        def step(h, w):
            y = jnp.tanh(fj.qgemm(h, w))  # typed [data, model] under the explicit mesh
            # The next layer needs all of K: gather the activations (not the weights).
            return (jax.sharding.reshard(y, NamedSharding(mesh, P("data"))) if sharded else y), None

        return jax.lax.scan(step, x, s)[0]

    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    compiled = jax.jit(run, static_argnums=2).lower(xs, sharded, True).compile()
    np.testing.assert_allclose(np.asarray(compiled(xs, sharded)), np.asarray(run(*_cpu((x, stacked)))), rtol=1e-6, atol=1e-6)
    # y is N-sharded, the next layer needs its K whole: only activations move.
    text = compiled.as_text()
    for line in text.splitlines():
        if " all-gather(" in line:
            assert "u32[" not in line.split("all-gather(")[0], line


# ------------------------------------------------------------------ shard_map


def _shard_map(f, mesh, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@pytest.mark.parametrize("group_size", [64, -1])
def test_shard_map_row_and_column_parallel(rng, mesh, group_size):
    qw = _weight(rng, 512, 64, group_size=group_size)
    x = jnp.asarray(rng.standard_normal((6, 512)), jnp.float32)
    specs = fj.shard_specs(qw, k_axis="data", n_axis="model", mesh=mesh)
    qws = _put(mesh, qw, specs)

    def local(x, w):  # x [6, 256], w holds [256, 16] of the weight
        return jax.lax.psum(fj.qgemm(x, w), "data")

    f = jax.jit(_shard_map(local, mesh, (P(None, "data"), specs), P(None, "model")))
    ref = fj.qgemm(*_cpu((x, qw)))
    x = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
    y = f(x, qws)
    _assert_close(y, ref)
    ops = _collectives(f.lower(x, qws).compile().as_text())
    assert ops["all-reduce"] == 1 and not any(ops[o] for o in MOVES_DATA), ops


def test_shard_map_rejects_a_bad_local_slice(rng, mesh):
    qw = _weight(rng, 256, 40)  # N = 40: 4 shards of 10 columns cut packed blocks
    bad = dataclasses.replace(qw, scales=qw.scales[:, :10])
    with pytest.raises(ValueError, match="scales must have shape"):
        fj.qgemm(jnp.ones((2, 256), jnp.float32), bad)


# ----------------------------------------------------------------- shard_specs


def test_shard_specs_values(rng):
    qw = _weight(rng, 512, 32, group_size=64)
    s = fj.shard_specs(qw, k_axis="a", n_axis=("b", "c"))
    assert isinstance(s, fj.QuantizedWeight) and s.shape == qw.shape and s.bits == qw.bits
    assert s.codes == P("a", ("b", "c"), None) and s.scales == P("a", ("b", "c")) and s.table == P(None)
    one_group = fj.shard_specs(_weight(rng, 512, 32, group_size=-1), k_axis="a")
    assert one_group.scales == P(None, None)  # a single scale row is replicated along K
    assert fj.shard_specs(qw) == dataclasses.replace(qw, codes=P(None, None, None), scales=P(None, None), table=P(None))


@pytest.mark.parametrize(
    "k,n,k_axis,n_axis,match",
    [
        (300, 32, "model", None, "multiple of 256"),
        (512, 40, None, "model", "multiple of 16"),
        (512, 32, "model", None, "multiple of 1024"),  # 2 K-blocks over 4 devices
        (512, 32, None, "model", "multiple of 64"),  # 2 N-blocks over 4 devices
        (512, 32, "model", "model", "only one dimension"),
        (512, 32, "expert", None, "not in the mesh"),
    ],
)
def test_shard_specs_rejects_splitting_blocks(rng, mesh, k, n, k_axis, n_axis, match):
    qw = _weight(rng, k, n)
    with pytest.raises(ValueError, match=match):
        fj.shard_specs(qw, k_axis, n_axis, mesh=mesh)


def test_partitioner_rejects_split_blocks(rng, mesh):
    qw = _weight(rng, 256, 64)
    x = jnp.ones((4, 256), jnp.float32)
    # Sharding the words of a packed block (not something shard_specs produces).
    bad = dataclasses.replace(fj.shard_specs(qw), codes=P(None, None, "model"))
    with pytest.raises(Exception, match="cannot be sharded"):
        jax.jit(fj.qgemm).lower(x, _put(mesh, qw, bad)).compile()
    # Codes cut along N one way, scales another.
    bad = dataclasses.replace(fj.shard_specs(qw, n_axis="model"), scales=P(None, "data"))
    with pytest.raises(Exception, match="sharded inconsistently"):
        jax.jit(fj.qgemm).lower(x, _put(mesh, qw, bad)).compile()


@pytest.mark.parametrize("k_axis,n_axis", [(None, "model"), ("model", None)])
def test_auto_axes_mesh(rng, k_axis, n_axis):
    # Classic (Auto axis types) meshes: Shardy propagates through the rule.
    auto = _mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    qw = _weight(rng, 1024, 64, group_size=64)
    x = jnp.asarray(rng.standard_normal((6, 1024)), jnp.float32)
    y, ops, _ = _run(auto, x, qw, P("data", k_axis), k_axis=k_axis, n_axis=n_axis)
    _assert_close(y, fj.qgemm(*_cpu((x, qw))))
    assert ops["all-reduce"] == (1 if k_axis else 0) and not any(ops[o] for o in MOVES_DATA), ops
    qws = _put(auto, qw, fj.shard_specs(qw, k_axis, n_axis, mesh=auto))
    loss = lambda x, s, w: jnp.sum(jnp.tanh(fj.qgemm(x, dataclasses.replace(w, scales=s))))  # noqa: E731
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for a, b in zip(g(x, qws.scales, qws), g(*_cpu((x, qw.scales, qw)))):
        # The K-sharded forward rounds differently (float32 partials), and tanh' amplifies it a little.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(b)).max())


# ------------------------------------------------ one K-block, N-block, scale group or row
# Shardy rejects a compound factor with a size-1 member; these shapes once produced one
# ("dim mapping can't have a factor of size 1 if there are multiple factors").


@pytest.mark.parametrize(
    "k,n,m,group_size,x_spec,k_axis,n_axis",
    [
        (256, 64, 8, 64, P("data"), None, None),  # one K-block, weight replicated
        (256, 64, 8, 64, P("data"), None, "model"),  # one K-block, N-sharded
        (256, 64, 4, 256, P(None, "model"), None, "model"),  # one K-block and group; x arrives K-sharded
        (512, 64, 6, 64, P(None, "data"), "data", None),  # 2 K-blocks over 2 devices
        (512, 64, 6, 256, P(None, "data"), "data", "model"),  # one group per K-block
        (512, 16, 8, 64, P("data"), None, None),  # one N-block
        (512, 16, 6, 32, P(None, "data"), "data", None),  # one N-block, K-sharded
        (512, 64, 4, -1, P(None, "data"), "data", "model"),  # one scale row, K- and N-sharded
        (256, 16, 1, -1, P(), None, None),  # one of everything, M = 1
        (512, 64, 1, 64, P(None, "data"), "data", "model"),  # M = 1
    ],
)
def test_single_block_group_or_row(rng, mesh, k, n, m, group_size, x_spec, k_axis, n_axis):
    qw = _weight(rng, k, n, group_size=group_size)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    with jax.set_mesh(mesh):
        y, ops, stablehlo = _run(mesh, x, qw, x_spec, k_axis, n_axis)
    assert "sdy.sharding_rule" in stablehlo
    assert (*y.sharding.spec, None, None)[1] == n_axis
    _assert_close(y, fj.qgemm(*_cpu((x, qw))))
    assert ops["all-reduce"] == (1 if k_axis else 0), ops
    assert not any(ops[o] for o in MOVES_DATA if o != "all-gather"), ops
    # Only x (K-sharded with a one-block weight) may be gathered, never weights.
    assert ops["all-gather"] == (1 if x_spec == P(None, "model") else 0), ops


def test_rule_has_no_size_one_compound_member():
    from flute_jax.quantize import num_groups

    # qgemm_rule directly, over shapes with one and several blocks / groups / rows.
    for k, n, m, gs in [(256, 16, 1, 64), (256, 64, 1, 256), (512, 16, 3, 256), (768, 48, 2, 32),
                        (512, 64, 4, -1), (300, 40, 2, 64), (256, 20, 1, 128)]:
        kb, nb, g = -(-k // 256), -(-n // 16), num_groups(k, gs)
        rule, kw = fj.sharding.qgemm_rule((m, k), (kb, nb, 512), (g, n), (16,))
        # Sizes: given for factors only in compounds, else those of the codes' block axes.
        sizes = {**kw, "kb": kb, "nb": nb}
        compounds = [c.split() for c in rule.replace(")", "(").split("(")[1::2]]
        for members in compounds:
            assert len(members) > 1 and all(sizes[f] > 1 for f in members), (rule, kw)
        assert "kb" in kw["reduction_factors"]
        # In-block positions never carry a sharding.
        assert {"w", "t"} <= set(kw["need_replication_factors"])
        if k % 256 == 0:
            assert "kin" in kw["need_replication_factors"]


def test_tiny_model_with_one_k_block(rng, mesh):
    # Two FluteDense layers with 256 input features under a (data, model) mesh, the
    # second row parallel over 'model' (1024 = 4 K-blocks), as in examples/tp_inference.
    import flax.linen as nn

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = fj.nn.FluteDense(1024, kernel_axes=("embed", "mlp"), name="up")(x)
            return fj.nn.FluteDense(256, kernel_axes=("mlp", "embed"), name="down")(jax.nn.silu(h))

    rules = (("batch", "data"), ("mlp", "model"), ("embed", None))
    model = Mlp()
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    boxed = model.init(jax.random.key(0), x)["params"]
    params = nn.meta.unbox(boxed)
    ref = model.apply({"params": _cpu(params)}, _cpu(x))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["down"]["kernel"].codes.sharding.spec[0] == "model"
    with jax.set_mesh(mesh):
        y = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, jax.device_put(x, NamedSharding(mesh, P("data"))))
    _assert_close(y, ref)
