"""Tensor-parallel inference of the quantized Llama of llama.py on a (data, model) mesh.

    python examples/tp_inference.py            # 8 simulated CPU devices: mesh data=2 x model=4

Column-parallel layers (the fused qkv and gate_up) split their kernel's N over 'model'
(their feature orders keep whole KV-head groups and gate/up pairs on one device);
row-parallel layers (o, down) split K over 'model', so each device holds 1/4 of every quantized weight
(codes, scales; the 16-entry table is replicated) and the KV cache is split over heads.
The batch is split over 'data'. Everything comes from the logical axis names the layers
carry (flute_jax.nn gives each QuantizedWeight leaf its own names) and the rules below; the
program is an ordinary jax.jit. It checks that the sharded logits equal the single-device run
(float32 model, so the only difference is the order of the partial sums of row-parallel layers),
and lists the collectives in the compiled decode step: one all-reduce per row-parallel layer and
nothing else (a feature order that split KV-head groups or gate/up pairs across devices would
need all-to-alls or permutes after the column-parallel layers).
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama  # noqa: E402

# logical axis -> mesh axis. K of o/down is 'heads'/'mlp' (row parallel), N of qkv/gate_up
# is 'heads'/'mlp' (column parallel); 'embed' (the residual stream) is not split.
RULES = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("vocab", None),
)


def main(argv=None) -> dict:
    cfg = llama.CONFIGS["tiny"]
    devices = jax.devices()
    if len(devices) < 8:
        devices = jax.devices("cpu")
    mesh = Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "model"))
    quant = dict(bits=4, group_size=64, table="nf")
    dtype = jnp.float32

    boxed = llama.quantize(llama.random_params(cfg, seed=1, dtype=dtype), 4, 64, "nf", dtype=dtype)
    params = nn.meta.unbox(boxed)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
    sharded = jax.device_put(params, shardings)
    model = llama.Llama(cfg, quant=quant, dtype=dtype)

    batch, prompt_len, steps = 4, 8, 6
    prompt = np.random.default_rng(0).integers(0, cfg.vocab, (batch, prompt_len)).astype(np.int32)

    step = jax.jit(lambda p, tok, cache, pos: model.apply({"params": p}, tok, cache, pos))

    def run(p, place):
        """Prefill + greedy decode; returns the logits of every step [B, prompt + steps - 1, V]."""
        cache = place(llama.init_cache(cfg, batch, prompt_len + steps, dtype))
        logits, cache = step(p, place(jnp.asarray(prompt)), cache, jnp.int32(0))
        out = [np.asarray(logits)]
        token = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
        for i in range(steps - 1):
            logits, cache = step(p, token, cache, jnp.int32(prompt_len + i))
            out.append(np.asarray(logits))
            token = jnp.argmax(logits, -1).astype(jnp.int32)
        return np.concatenate(out, 1)

    single = run(params, lambda t: t)
    cache_sharding = NamedSharding(mesh, P("data", None, "model", None))
    batch_sharding = NamedSharding(mesh, P("data", None))

    def place(tree):
        return jax.tree.map(lambda a: jax.device_put(a, cache_sharding if a.ndim == 4 else batch_sharding), tree)

    with (jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh), nn.logical_axis_rules(RULES):
        tp = run(sharded, place)
        hlo = step.lower(sharded, place(jnp.zeros((batch, 1), jnp.int32)),
                         place(llama.init_cache(cfg, batch, prompt_len + steps, dtype)), jnp.int32(0)).compile().as_text()
    collectives = dict(Counter(re.findall(
        r"\s(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)))

    up = sharded["layers_0"]["gate_up"]["kernel"]
    down = sharded["layers_0"]["down"]["kernel"]
    print(f"mesh {dict(mesh.shape)}; layers_0/gate_up codes {up.codes.shape} -> per device "
          f"{up.codes.addressable_shards[0].data.shape} ({up.codes.sharding.spec}); "
          f"down codes {down.codes.shape} -> {down.codes.addressable_shards[0].data.shape} ({down.codes.sharding.spec})")
    diff = float(np.max(np.abs(tp - single)) / np.max(np.abs(single)))
    top1 = float(np.mean(tp.argmax(-1) == single.argmax(-1)))
    print(f"sharded vs single-device logits: max |diff| / max |logit| = {diff:.2e}, top-1 agreement {top1:.3f}")
    print(f"collectives in the compiled decode step ({cfg.layers} layers): {collectives}")
    return {"single": single, "tp": tp, "max_rel_diff": diff, "top1": top1, "collectives": collectives,
            "up_shard": up.codes.addressable_shards[0].data.shape, "down_shard": down.codes.addressable_shards[0].data.shape}


if __name__ == "__main__":
    main(sys.argv[1:])
