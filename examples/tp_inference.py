"""Tensor-parallel inference of the quantized Llama of llama.py on a (data, model) mesh.

    python examples/tp_inference.py                    # 8 simulated CPU devices: data=2 x model=4, tiny model
    python examples/tp_inference.py --config 70b --tp 2 --bench    # 2 GPUs, 70B-shaped model, 4-bit g128

Column-parallel layers (the fused qkv and gate_up) split their kernel's N over 'model'
(their feature orders keep whole KV-head groups and gate/up pairs on one device);
row-parallel layers (o, down) split K over 'model', so each device holds 1/tp of every
quantized weight (codes, scales; the table is replicated) and the KV cache is split over
heads. The batch is split over 'data'. Everything comes from the logical axis names the
layers carry (flute_jax.nn gives each QuantizedWeight leaf its own names) and the rules
below, and the result is the sharding ``flute_jax.shard_specs`` gives (checked here); the
program is an ordinary jax.jit.

It checks that the sharded logits equal the single-device run (prefill, then greedy
decoding; with float32 activations the only difference is the order of the row-parallel
partial sums, in bfloat16 also where the sums are rounded), and lists the collectives in
the compiled decode step: one all-reduce per row-parallel layer and nothing else (a feature
order that split KV-head groups or gate/up pairs across devices would need all-to-alls or
permutes after the column-parallel layers, and a weight sharding the kernel could not use
would show up as an all-gather).

``--bench`` then measures decode tokens/s (llama.py's on-device decode loop, 32 greedy
tokens per call, KV cache filled to ``--context``) of the quantized and the bf16 model at
each tensor-parallel degree of ``--bench-tp`` and batch of ``--bench-batches``. Random
weights are made on the devices a layer at a time (``llama.init_params``), so a 70B-shaped
model needs no host copy; a variant that does not fit in device memory is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import flute_jax  # noqa: E402

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
# how each projection is split: (k_axis, n_axis) for flute_jax.shard_specs
PARALLEL = {"qkv": (None, "model"), "gate_up": (None, "model"), "o": ("model", None), "down": ("model", None)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_mesh(devices, data: int, tp: int) -> Mesh:
    if data * tp > len(devices):
        raise SystemExit(f"a data={data} x model={tp} mesh needs {data * tp} devices, {len(devices)} present")
    return Mesh(np.array(devices[: data * tp]).reshape(data, tp), ("data", "model"))


def mesh_context(mesh: Mesh):
    """The mesh (for the logical sharding constraints inside the model) as a context."""
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def placer(mesh: Mesh):
    """Puts a token batch [B, T] (split over 'data') or a KV cache (each [B, S, kv_heads, head_dim],
    split over 'data' and 'model') on ``mesh``."""
    cache_sharding = NamedSharding(mesh, P("data", None, "model", None))
    batch_sharding = NamedSharding(mesh, P("data", None))

    def place(tree):
        return jax.tree.map(lambda a: jax.device_put(a, cache_sharding if a.ndim == 4 else batch_sharding), tree)

    return place


def check_shard_specs(params: dict, mesh: Mesh) -> None:
    """The shardings the logical rules gave the quantized projections are flute_jax.shard_specs'."""
    for name, (k_axis, n_axis) in PARALLEL.items():
        qw = params["layers_0"][name]["kernel"]
        if not isinstance(qw, flute_jax.QuantizedWeight):
            continue
        want = flute_jax.shard_specs(qw, k_axis=k_axis, n_axis=n_axis, mesh=mesh)
        for leaf in ("codes", "scales", "table"):
            got = getattr(qw, leaf).sharding
            expected = NamedSharding(mesh, getattr(want, leaf))
            if not got.is_equivalent_to(expected, getattr(qw, leaf).ndim):
                raise AssertionError(f"{name}.{leaf}: sharded as {got.spec}, shard_specs gives {expected.spec}")


def greedy_logits(step, params, prompt: np.ndarray, steps: int, cfg: llama.Config, dtype, place) -> np.ndarray:
    """Prefill + greedy decode; the logits of every step, float32 [B, prompt + steps - 1, V]."""
    batch, prompt_len = prompt.shape
    cache = place(llama.init_cache(cfg, batch, prompt_len + steps, dtype))
    logits, cache = step(params, place(jnp.asarray(prompt)), cache, jnp.int32(0))
    out = [np.asarray(logits)]
    token = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    for i in range(steps - 1):
        logits, cache = step(params, token, cache, jnp.int32(prompt_len + i))
        out.append(np.asarray(logits))
        token = jnp.argmax(logits, -1).astype(jnp.int32)
    return np.concatenate(out, 1)


def collectives(hlo: str) -> dict:
    return dict(Counter(re.findall(r"\s(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)))


def check_against_single_device(cfg, model, params, mesh, single_device, dtype, batch, prompt_len, steps, seed) -> dict:
    """Logits of the sharded run vs the same params on one device, and the decode step's collectives."""
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab, (batch, prompt_len)).astype(np.int32)
    step = jax.jit(lambda p, tok, cache, pos: model.apply({"params": p}, tok, cache, pos))
    one = Mesh(np.array([single_device]).reshape(1, 1), ("data", "model"))
    single_params = jax.device_put(params, NamedSharding(one, P()))
    start = time.perf_counter()
    single = greedy_logits(step, single_params, prompt, steps, cfg, dtype, placer(one))
    del single_params
    place = placer(mesh)
    with mesh_context(mesh), nn.logical_axis_rules(RULES):
        tp = greedy_logits(step, params, prompt, steps, cfg, dtype, place)
        decode_args = (params, place(jnp.zeros((batch, 1), jnp.int32)),
                       place(llama.init_cache(cfg, batch, prompt_len + steps, dtype)), jnp.int32(0))
        hlo = step.lower(*decode_args).compile().as_text()
    rel_frobenius = float(np.linalg.norm((tp - single).astype(np.float64)) / np.linalg.norm(single.astype(np.float64)))
    return {
        "single": single, "tp": tp,
        "max_rel_diff": float(np.max(np.abs(tp - single)) / np.max(np.abs(single))),
        "rel_frobenius": rel_frobenius,
        "top1": float(np.mean(tp.argmax(-1) == single.argmax(-1))),
        "collectives": collectives(hlo),
        "check_s": time.perf_counter() - start,
    }


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def device_bytes(params) -> int:
    """Bytes of ``params`` on the first device (its shards; replicated leaves in full)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))


def bench(cfg, quant: dict, devices, tps, batches, context: int, steps: int, seed: int, variants,
          attention: str = "auto") -> list[dict]:
    """Decode tokens/s of each variant ("quant" or "bf16") at each TP degree and batch (a model=tp
    mesh over the first tp devices), with the quantized model's speed-up over bf16 at the same TP.
    Both variants run their decode steps' attention layers by ``attention`` (llama.ATTENTION)."""
    rows = []

    def record(name, tp, batch, tok_s, **extra):
        rows.append({"variant": name, "tp": tp, "batch": batch, "context": context, "tokens_per_s": tok_s, **extra})

    for variant in variants:
        q = quant if variant == "quant" else None
        name = f"{quant['bits']}bit-g{quant['group_size']}" if q else "bf16"
        model = llama.Llama(cfg, quant=q, dtype=jnp.bfloat16, attention=attention)
        for tp in tps:
            mesh = make_mesh(devices, 1, tp)
            params = None
            for batch in batches:
                start = time.perf_counter()
                try:
                    if params is None:
                        params = llama.init_params(cfg, seed, q, dtype=jnp.bfloat16, mesh=mesh, rules=RULES)
                    with mesh_context(mesh), nn.logical_axis_rules(RULES):
                        tok_s = llama.bench_decode(model, params, batch, context, steps, loop=True, place=placer(mesh))
                except Exception as error:  # noqa: BLE001 -- only device-memory exhaustion is expected here
                    if not is_out_of_memory(error):
                        raise
                    print(f"{name:10s} tp {tp} batch {batch:3d}: does not fit in device memory "
                          f"({str(error).splitlines()[0][:200]})", flush=True)
                    record(name, tp, batch, None, error="out of device memory")
                    continue
                gib = device_bytes(params) / 2**30
                record(name, tp, batch, tok_s, weights_gib_per_device=gib)
                print(f"{name:10s} tp {tp} batch {batch:3d}: {tok_s:9.1f} tokens/s ({gib:.1f} GiB of weights "
                      f"per device; {time.perf_counter() - start:.0f} s)", flush=True)
            del params
    base = {(r["tp"], r["batch"]): r["tokens_per_s"] for r in rows if r["variant"] == "bf16"}
    for r in rows:
        b = base.get((r["tp"], r["batch"]))
        r["speedup_vs_bf16"] = r["tokens_per_s"] / b if r["tokens_per_s"] and b else None
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny", choices=sorted(llama.CONFIGS))
    ap.add_argument("--tp", type=int, default=4, help="devices on the 'model' axis")
    ap.add_argument("--data", type=int, help="devices on the 'data' axis (default: the devices left, at most 2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="activation/param dtype (default: float32 for tiny, else bfloat16)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, help="default: 64 for tiny, else 128")
    ap.add_argument("--table", default="nf")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="logits compared at prefill and steps - 1 greedy decode steps")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-check", action="store_true", help="skip the sharded vs single-device check")
    ap.add_argument("--bench", action="store_true", help="decode tokens/s, quantized vs bf16, at each --bench-tp")
    ap.add_argument("--bench-tp", default="1,2")
    ap.add_argument("--bench-batches", default="1,16")
    ap.add_argument("--bench-variants", default="quant,bf16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--bench-steps", type=int, default=32, help="greedy tokens per decode-loop call")
    ap.add_argument("--json", help="write the results (without logits) to this file")
    ap.add_argument("--attention", default="auto", choices=llama.ATTENTION,
                    help="decode steps' attention layers (llama.ATTENTION): the Pallas kernels per device on NVIDIA "
                         "GPUs (auto), pallas (interpreted off GPUs: slow), cudnn, or xla")
    args = ap.parse_args(argv)
    unknown = set(args.bench_variants.split(",")) - {"quant", "bf16"}
    if unknown:
        ap.error(f"unknown --bench-variants {sorted(unknown)}; choose from quant, bf16")

    cfg = llama.CONFIGS[args.config]
    tiny = args.config.startswith("tiny")
    dtype = DTYPES[args.dtype or ("float32" if tiny else "bfloat16")]
    quant = dict(bits=args.bits, group_size=args.group_size or (64 if tiny else 128), table=args.table)
    devices = jax.devices()
    if len(devices) < args.tp:
        devices = jax.devices("cpu")
    data = args.data or max(1, min(2, len(devices) // args.tp))
    mesh = make_mesh(devices, data, args.tp)

    if args.no_check:
        out = {}
    else:
        out = check(args, cfg, quant, dtype, devices, mesh, data)
    if args.bench:
        out["bench"] = bench(cfg, quant, devices, [int(t) for t in args.bench_tp.split(",")],
                             [int(b) for b in args.bench_batches.split(",")], args.context, args.bench_steps, args.seed,
                             args.bench_variants.split(","), args.attention)
        print(json.dumps(out["bench"], indent=1))
    if args.json:
        keep = {k: v for k, v in out.items() if k not in ("single", "tp")}
        keep.update(config=args.config, mesh=dict(mesh.shape), platform=devices[0].platform, quant=quant,
                    dtype=jnp.dtype(dtype).name, device_kind=devices[0].device_kind)
        with open(args.json, "w") as f:
            json.dump(keep, f, indent=1, default=str)
    return out


def check(args, cfg, quant, dtype, devices, mesh, data) -> dict:
    """Sharded random model vs the same params on one device (see check_against_single_device)."""
    model = llama.Llama(cfg, quant=quant, dtype=dtype, attention=args.attention)
    start = time.perf_counter()
    sharded = llama.init_params(cfg, args.seed, quant, dtype=dtype, mesh=mesh, rules=RULES)
    jax.block_until_ready(sharded)
    init_s = time.perf_counter() - start
    check_shard_specs(sharded, mesh)
    out = check_against_single_device(cfg, model, sharded, mesh, devices[0], dtype, args.batch * data,
                                      args.prompt_len, args.steps, args.seed)

    up = sharded["layers_0"]["gate_up"]["kernel"]
    down = sharded["layers_0"]["down"]["kernel"]
    out.update(up_shard=up.codes.addressable_shards[0].data.shape, down_shard=down.codes.addressable_shards[0].data.shape)
    print(f"{args.config} on {devices[0].platform} mesh {dict(mesh.shape)}, {quant['bits']}-bit g{quant['group_size']} "
          f"{jnp.dtype(dtype).name} (random weights made on the devices in {init_s:.0f} s); layers_0/gate_up codes "
          f"{up.codes.shape} -> per device {out['up_shard']} ({up.codes.sharding.spec}); down codes {down.codes.shape} "
          f"-> {out['down_shard']} ({down.codes.sharding.spec}); shardings match flute_jax.shard_specs")
    print(f"sharded vs single-device logits: max |diff| / max |logit| = {out['max_rel_diff']:.2e}, "
          f"relative Frobenius {out['rel_frobenius']:.2e}, top-1 agreement {out['top1']:.3f} ({out['check_s']:.0f} s)")
    print(f"collectives in the compiled decode step ({cfg.layers} layers): {out['collectives']}", flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
