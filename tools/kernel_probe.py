"""Kernel probe (developer tool, GPU): per-kernel device time of single qgemm calls.

Unlike ``python -m flute_jax.bench`` (device time per *call*, all kernels summed), this
prints each kernel's own median duration, so a memset, the FLUTE kernel and any
fix-up show separately; and it is a small, predictable target for Nsight Compute:

    python tools/kernel_probe.py --shapes 4096x4096,8192x57344 --m 1 --bits 4
    ncu --set full --kernel-name regex:Flute --launch-skip 20 --launch-count 1 \\
        -o prof python tools/kernel_probe.py --shapes 4096x4096 --calls 30 --no-trace

Weights rotate over enough distinct sets that each call streams them from DRAM.
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import flute_jax as fj
from flute_jax import layout
from flute_jax.bench import trace


def make_sets(k: int, n: int, bits: int, group: int, dtype, n_sets: int, seed: int = 0):
    key = jax.random.key(seed)
    sets = []
    groups = 1 if group == -1 else -(-k // group)
    for i in range(n_sets):
        kc, ks, key = jax.random.split(key, 3)
        codes = jax.random.bits(kc, layout.packed_shape(k, n, bits), jnp.uint32)
        scales = (0.02 * (1 + jax.random.uniform(ks, (groups, n)))).astype(dtype)
        table = jnp.asarray(fj.tables.nf(bits), dtype)
        sets.append(fj.QuantizedWeight(codes, scales, table, bits=bits, group_size=group, shape=(k, n)))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096", help="comma-separated KxN")
    ap.add_argument("--m", default="1", help="comma-separated M values")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--no-trace", action="store_true", help="just run the calls (for ncu)")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    fn = jax.jit(fj.qgemm)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for bits in (int(b) for b in args.bits.split(",")):
            wbytes = k * n * bits // 8
            n_sets = max(2, min(64, (400 << 20) // max(wbytes, 1)))
            sets = make_sets(k, n, bits, args.group_size, dtype, n_sets)
            for m in (int(v) for v in args.m.split(",")):
                x = jax.random.normal(jax.random.key(m), (m, k), dtype)
                for w in sets[:2]:
                    fn(x, w).block_until_ready()
                if args.no_trace:
                    for i in range(args.calls):
                        fn(x, sets[i % n_sets])
                    jax.block_until_ready(fn(x, sets[0]))
                    continue
                with tempfile.TemporaryDirectory() as d:
                    with jax.profiler.trace(d, create_perfetto_trace=True):
                        for i in range(args.calls):
                            y = fn(x, sets[i % n_sets])
                        y.block_until_ready()
                    dev = trace.device_events(trace.load_events(trace.find_trace_file(d)))
                durs = collections.defaultdict(list)
                for e in dev.events:
                    durs[e["name"][:60]].append(float(e["dur"]))
                roof_us = (wbytes + 2 * (m * k + m * n)) / 3.0e6
                for name, ds in durs.items():
                    rows.append((f"{k}x{n}", m, bits, name, len(ds), float(np.median(ds)), roof_us))
    for r in rows:
        print(f"{r[0]:>12} M={r[1]:<4} b={r[2]} {r[3]:<60} n={r[4]:<4} median {r[5]:8.2f} us  (roofline@3TB/s {r[6]:.2f} us)")


if __name__ == "__main__":
    main()
