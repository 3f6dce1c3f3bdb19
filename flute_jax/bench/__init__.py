"""``python -m flute_jax.bench``: flute_jax.qgemm against XLA baselines, by device time.

Modules, one job each:
  shapes   Llama-3 presets with tensor-parallel splits, explicit KxN lists
  methods  the four compared computations (flute, XLA dot, XLA int4 dequant+dot, naive LUT)
  trace    reading per-call device time out of a JAX profiler perfetto trace
  timing   clocks (profiler device time on GPU, wall clock on CPU), copy bandwidth
  hlo      the compiled ops of each benchmarked function
  device   device name, L2 size, driver and library versions
  runner   the sweep: weight-set rotation against L2, warm-up, rounds, checks
  report   terminal table, Markdown (BENCHMARKS.md), plot
  cli      argument parsing; ``main(argv)``

See docs/benchmarking.md for the method and how to read the numbers.
"""

from .cli import main

__all__ = ["main"]
