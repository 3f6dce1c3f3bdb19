"""Where a decode step's device time goes: kernels of the Llama example, by kind.

    python tools/profile_step.py --config 8b --batch 1 --context 512 \
        --variants bf16,4bit-g128,4bit-g128-head [--mode loop]

For each variant: wall time per step, host time to enqueue a step, device-busy time per step (sum of kernel
durations), the gap between them (launch and dependency latency the device sits
idle), and the device time per kernel kind (FLUTE qgemm, memset, XLA gemm
fusions, other fusions), with the longest kernels. GPU only.

``--mode step`` (default) profiles one jitted call per token; ``--mode loop`` profiles the
on-device decode loop that ``examples/llama.py --bench-modes loop`` times (``--steps`` tokens
per call). XLA compiles them differently: in the loop the KV cache is loop-carried, so XLA
picks its layout, and with XLA's attention the per-step program transposes the cache
instead (batch 16: 16.7 us per layer, BENCHMARKS.md "Session 22").
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import llama  # noqa: E402

from flute_jax.bench import trace  # noqa: E402


def kind_of(name: str) -> str:
    """A kernel's kind from its (demangled) name."""
    if "Flute" in name or "flute" in name:
        return "flute " + ("tile" if "Tile" in name else "dequant" if "Dequant" in name else "decode")
    if name.startswith("Memset") or "memset" in name.lower():
        return "memset"
    if name.startswith("Memcpy"):
        return "memcpy"
    if "decode_attention" in name:
        return "attention (pallas)"
    if "rms_norm" in name:
        return "norm (pallas)"
    if any(s in name.lower() for s in ("cudnn", "fmha", "sdpa", "flash")):
        return "attention (cudnn)"
    if "gemm" in name or "dot" in name or "cublas" in name.lower() or "nvjet" in name:
        return "xla gemm"
    return "other"


def profile(model: llama.Llama, params, batch: int, context: int, steps: int, mode: str = "step") -> dict:
    token = jnp.zeros((batch, 1), jnp.int32)
    if mode == "loop":  # one call decodes `steps` tokens; the cache stays at context .. context + steps
        loop = llama.make_decode_loop(model, steps)
        cache = llama.init_cache(model.cfg, batch, context + steps)

        def run(cache):
            return loop(params, token, cache, jnp.int32(context))
    else:
        step = llama.make_step(model)
        cache = llama.init_cache(model.cfg, batch, context + steps)

        def run(cache):
            for i in range(steps):
                logits, cache = step(params, token, cache, jnp.int32(context + i))
            return logits, cache
    out, cache = run(cache)  # compile and warm up
    jax.block_until_ready(out)
    start = time.perf_counter()
    out, cache = run(cache)
    dispatch = (time.perf_counter() - start) / steps  # host time to enqueue a step
    jax.block_until_ready(out)
    wall = (time.perf_counter() - start) / steps
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            out, cache = run(cache)
            jax.block_until_ready(out)
        events = trace.device_events(trace.load_events(trace.find_trace_file(log_dir))).events
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        dur = float(e.get("dur", 0.0)) / steps
        for table, key in ((by_kind, kind_of(e["name"])), (by_name, e["name"])):
            table[key][0] += dur
            table[key][1] += 1
    span = (float(events[-1]["ts"]) + float(events[-1]["dur"]) - float(events[0]["ts"])) / steps
    return {"wall_us": wall * 1e6, "dispatch_us": dispatch * 1e6, "busy_us": sum(v[0] for v in by_kind.values()), "span_us": span,
            "kernels_per_step": len(events) / steps, "by_kind": dict(by_kind), "by_name": dict(by_name)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="8b", choices=sorted(llama.CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="bf16,4bit-g128,4bit-g128-head")
    ap.add_argument("--top", type=int, default=12, help="longest kernels to list per variant")
    ap.add_argument("--attention", default="auto", choices=llama.ATTENTION, help="decode steps' attention layers (llama.ATTENTION)")
    ap.add_argument("--norm", default="auto", choices=llama.NORM, help="residual adds and RMSNorms (llama.NORM)")
    ap.add_argument("--mlp", default="fused", choices=llama.MLP, help="the quantized variants' MLP gate (llama.MLP)")
    ap.add_argument("--mode", default="step", choices=("step", "loop"),
                    help="step: one jitted call per token; loop: the on-device decode loop of --steps tokens")
    args = ap.parse_args(argv)
    cfg = llama.CONFIGS[args.config]
    dense = nn.meta.unbox(llama.random_params(cfg, 0))
    for name in args.variants.split(","):
        model, params = llama.bench_variant(cfg, dense, name, args.attention, args.norm, args.mlp)
        r = profile(model, params, args.batch, args.context, args.steps, args.mode)
        print(f"== {name} batch {args.batch} attention {args.attention} norm {args.norm} mlp {args.mlp} mode {args.mode}: wall {r['wall_us']:.0f} us/step ({args.batch * 1e6 / r['wall_us']:.1f} tok/s), "
              f"host enqueue {r['dispatch_us']:.0f} us, device busy {r['busy_us']:.0f} us, span {r['span_us']:.0f} us, {r['kernels_per_step']:.0f} kernels/step")
        for kind, (us, count) in sorted(r["by_kind"].items(), key=lambda kv: -kv[1][0]):
            print(f"   {kind:14s} {us:8.1f} us/step  {count / args.steps:6.0f} kernels/step  {us / max(count / args.steps, 1):7.2f} us each")
        for kname, (us, count) in sorted(r["by_name"].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"     {us:8.1f} us  x{count / args.steps:4.0f}  {kname[:110]}")
        del params


if __name__ == "__main__":
    main()
