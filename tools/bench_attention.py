"""Device time of a decode step's attention layer (rotary embedding, KV cache update,
attention) in the Llama example, per layer, by each way llama.attention_layer offers, and the
Pallas kernels at chosen splits and key blocks. GPU only.

    python tools/bench_attention.py --batches 1,16 --context 512 [--pallas 16x32,32x32,8x64]

A call runs the layer ``--layers`` times in a ``lax.fori_loop`` that carries the caches (as the
decode loop does), on one 8B-shaped layer's heads (32 query heads, 8 KV heads, head size
128); the time per layer is the device time of the loop's kernels (a profiler trace) divided
by the layers. ``--pallas SxB``: S splits per (sequence, KV head), B keys per block.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import decode_attention  # noqa: E402
import llama  # noqa: E402

from flute_jax.bench import trace  # noqa: E402


def layer_loop(how: str, freqs: np.ndarray, layers: int, splits=None, block_k=None):
    """jit: (qkv, cache_k, cache_v, pos) -> (out, caches) after ``layers`` attention layers."""
    def one(qkv, ck, cv, pos):
        if how == "pallas" and splits is not None:
            angles = pos.astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)
            return decode_attention.decode_step_attention(qkv[:, 0], ck, cv, pos, jnp.cos(angles), jnp.sin(angles),
                                                          splits=splits, block_k=block_k)
        return llama.attention_layer(qkv, ck, cv, pos, freqs, how)

    def run(qkv, ck, cv, pos):
        def body(i, carry):
            _, ck, cv = carry  # the caches carry the layers' order
            return one(qkv, ck, cv, pos)
        b, _, kv_heads, g2, d = qkv.shape
        out = jnp.zeros((b, 1, kv_heads * (g2 - 2), d), qkv.dtype)
        return jax.lax.fori_loop(0, layers, body, (out, ck, cv))
    return jax.jit(run, donate_argnums=(1, 2))


def device_us_per_layer(f, args, layers: int, calls: int = 5) -> tuple[float, float]:
    out = f(*args)
    jax.block_until_ready(out)
    qkv, ck, cv, pos = args[0], out[1], out[2], args[3]
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                out = f(qkv, ck, cv, pos)
                ck, cv = out[1], out[2]
            jax.block_until_ready(out)
        events = trace.device_events(trace.load_events(trace.find_trace_file(log_dir))).events
    busy = sum(float(e.get("dur", 0.0)) for e in events) / (calls * layers)
    span = (float(events[-1]["ts"]) + float(events[-1]["dur"]) - float(events[0]["ts"])) / (calls * layers)
    return busy, span


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--context", type=int, default=512, help="the step's position (keys 0..context visible)")
    ap.add_argument("--cache", type=int, default=0, help="cache length (default context + 32)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ways", default="xla,cudnn,auto")
    ap.add_argument("--pallas", default="", help="comma-separated SxB settings of the Pallas kernels")
    args = ap.parse_args(argv)
    cfg = llama.CONFIGS["8b"]
    freqs = llama.rope_frequencies(cfg)
    group = cfg.heads // cfg.kv_heads
    cache_len = args.cache or args.context + 32
    rng = np.random.default_rng(0)
    ways = [(w, None, None) for w in args.ways.split(",") if w]
    ways += [("pallas", int(s), int(b)) for s, b in (x.split("x") for x in args.pallas.split(",") if x)]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for how, splits, block_k in ways:
            qkv = jnp.asarray(rng.standard_normal((batch, 1, cfg.kv_heads, group + 2, cfg.head_dim)), jnp.bfloat16)
            ck = jnp.asarray(rng.standard_normal((batch, cache_len, cfg.kv_heads, cfg.head_dim)), jnp.bfloat16)
            cv = jnp.asarray(rng.standard_normal((batch, cache_len, cfg.kv_heads, cfg.head_dim)), jnp.bfloat16)
            f = layer_loop(how, freqs, args.layers, splits, block_k)
            busy, span = device_us_per_layer(f, (qkv, ck, cv, jnp.int32(args.context)), args.layers)
            name = how if splits is None else f"pallas {splits}x{block_k}"
            rows.append(dict(batch=batch, context=args.context, way=name, busy_us=busy, span_us=span))
            print(f"batch {batch:3d} context {args.context} {name:16s}: {busy:7.2f} us busy, {span:7.2f} us span per layer",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
