"""Dequantize benchmark (developer tool, GPU): our CUDA kernel vs the jax.numpy fusion.

    python tools/bench_dequant.py [--shapes 4096x4096,8192x57344] [--bits 4,3,2]

Device time per call from a profiler trace (flute_jax.bench.timing), over weight sets
that together exceed L2, and the bandwidth reached: bytes = packed codes + scales
read + W [K, N] written in bfloat16, against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flute_jax import autodiff, dense, layout
from flute_jax.bench import timing


def weight_sets(k: int, n: int, bits: int, group: int, dtype, count: int) -> list[tuple]:
    key = jax.random.key(0)
    sets = []
    for _ in range(count):
        kc, ks, kt, key = jax.random.split(key, 4)
        codes = jax.random.bits(kc, layout.packed_shape(k, n, bits), jnp.uint32)
        scales = jax.random.uniform(ks, (-(-k // group), n), jnp.float32, 0.5, 1.5).astype(dtype)
        table = jax.random.normal(kt, (2**bits,), jnp.float32).astype(dtype)
        sets.append((codes, scales, table))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x28672,8192x8192,8192x57344")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    device = jax.devices()[0]
    if device.platform != "gpu":
        raise SystemExit("bench_dequant.py needs a CUDA GPU (the kernel is CUDA-only)")
    clock = timing.make_clock("profiler", device)
    bw = timing.copy_bandwidth(clock, 1 << 30, 10)["bytes_per_s"]
    dtype = jnp.bfloat16
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for bits in (int(b) for b in args.bits.split(",")):
            g = args.group_size
            nbytes = k * n * bits // 8 + -(-k // g) * n * 2 + k * n * 2
            sets = weight_sets(k, n, bits, g, dtype, max(2, min(16, (400 << 20) // nbytes)))
            kernel = jax.jit(functools.partial(dense.dequantize_cuda, bits=bits, group_size=g, k=k))
            fused = jax.jit(lambda c, s, t, bits=bits, k=k: autodiff.dequantized(
                c, s, t, bits=bits, group_size=g, k=k).astype(dtype))
            row = {"shape": f"{k}x{n}", "bits": bits}
            for name, fn in (("kernel", kernel), ("jnp", fused)):
                jax.block_until_ready([fn(*s) for s in sets[:2]])
                t = clock.time(fn, sets, args.calls)
                us = float(np.median(t.per_call_us)) if t.per_call_us else t.mean_us
                row[name] = us
            same = all(np.array_equal(np.asarray(kernel(*s)).view(np.uint16), np.asarray(fused(*s)).view(np.uint16))
                       for s in sets[:1])
            row.update(gbs=nbytes / row["kernel"] / 1e3, roof=nbytes / bw / 1e-6 / row["kernel"], same=same)
            rows.append(row)
            print(f"{row['shape']:>11} {bits}-bit: kernel {row['kernel']:8.1f} us ({row['gbs']:6.0f} GB/s, "
                  f"{100 * row['roof']:3.0f}% of copy), jnp {row['jnp']:8.1f} us, "
                  f"{row['jnp'] / row['kernel']:4.1f}x, bits equal: {same}", flush=True)
    print(f"\nsummary (copy bandwidth {bw / 1e9:.0f} GB/s): geomean kernel speed-up over the jnp fusion "
          f"{float(np.exp(np.mean([np.log(r['jnp'] / r['kernel']) for r in rows]))):.2f}x, "
          f"kernel at {100 * float(np.mean([r['roof'] for r in rows])):.0f}% of copy bandwidth on average")


if __name__ == "__main__":
    main()
