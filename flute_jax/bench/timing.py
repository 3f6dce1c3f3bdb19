"""Clocks: time N calls of a jitted function, one call per argument set, in rotation.

``ProfilerClock`` (GPU): runs the calls inside ``jax.profiler.trace`` and sums, per call,
the durations of the kernels/memcpys on ``/device:GPU:0`` (see :mod:`.trace`). Host
dispatch (10-30 us per call) is not in it, which matters for 3-50 us kernels.

``WallClock`` (CPU, or ``--clock wall``): ``perf_counter`` around each call plus
``block_until_ready``; this is what a CPU run reports, labelled as wall-clock.

Both take the same inputs and return a :class:`~.trace.CallTimes`, so the sweep code
above them is the same on CPU and GPU and the CPU test exercises it.
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import trace


def _run(fn: Callable, arg_sets: Sequence[tuple], n_calls: int, start: int = 0):
    """``n_calls`` calls, call ``i`` on ``arg_sets[(start + i) % len(arg_sets)]``; returns the last y."""
    y = None
    for i in range(n_calls):
        y = fn(*arg_sets[(start + i) % len(arg_sets)])
    return y


class WallClock:
    name = "wall"
    unit_note = "CPU wall-clock per call (dispatch included)"

    def time(self, fn: Callable, arg_sets: Sequence[tuple], n_calls: int) -> trace.CallTimes:
        per_call = []
        for i in range(n_calls):
            args = arg_sets[i % len(arg_sets)]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            per_call.append((time.perf_counter() - t0) * 1e6)
        return trace.CallTimes(per_call, float(np.mean(per_call)), [], "per-call")


class ProfilerClock:
    name = "profiler"
    unit_note = "device time per call from a JAX profiler trace"

    def __init__(self, process_name: str = "/device:GPU:0"):
        self.process_name = process_name
        self.last_lines: list = []

    def time(self, fn: Callable, arg_sets: Sequence[tuple], n_calls: int) -> trace.CallTimes:
        # Everything the arguments need is on the device before tracing starts, so the
        # only device work inside the trace is the n_calls executions of fn.
        jax.block_until_ready(arg_sets)
        with tempfile.TemporaryDirectory(prefix="flute_bench_trace_") as log_dir:
            with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=_options()):
                jax.block_until_ready(_run(fn, arg_sets, n_calls))
            events = trace.load_events(trace.find_trace_file(log_dir))
        dev = trace.device_events(events, self.process_name)
        self.last_lines = dev.lines
        return trace.split_calls(dev.events, n_calls)


def _options():
    """Profiler options: no Python function tracing and no HLO dumps (they only slow the trace)."""
    make = getattr(jax.profiler, "ProfileOptions", None)
    if make is None:
        return None
    opts = make()
    for name, value in (("python_tracer_level", 0), ("enable_hlo_proto", False)):
        if hasattr(opts, name):
            setattr(opts, name, value)
    return opts


def make_clock(kind: str, device: jax.Device):
    """``"auto"``: profiler on GPU, wall clock on CPU."""
    if kind not in ("auto", "profiler", "wall"):
        raise ValueError(f"--clock must be auto, profiler or wall, got {kind!r}")
    if kind == "auto":
        kind = "profiler" if device.platform == "gpu" else "wall"
    if kind == "profiler" and device.platform != "gpu":
        raise ValueError("--clock profiler needs a GPU (device events come from /device:GPU:N)")
    if kind == "profiler":
        return ProfilerClock(f"/device:GPU:{getattr(device, 'local_hardware_id', None) or 0}")
    return WallClock()


def copy_bandwidth(clock, nbytes: int, calls: int, warmup: int = 2) -> dict:
    """Bytes read + written per second of a large device-to-device copy.

    Two variants, both over one ``uint32`` buffer of ``nbytes`` (>> L2 on a GPU): XLA's
    copy of a parameter (a D2D memcpy on GPU) and an elementwise ``xor`` kernel that
    cannot be elided. The faster one is the roofline's bandwidth: the roofline should be
    the best the memory system is seen to do in this run.
    """
    n = max(1, nbytes // 4)
    a = jax.random.bits(jax.random.key(7), (n,), jnp.uint32)
    variants = {
        "copy": jax.jit(lambda v: jnp.copy(v)),
        "xor": jax.jit(lambda v: v ^ jnp.uint32(0x5A5A5A5A)),
    }
    out = {"bytes_moved_per_call": 2 * 4 * n, "variants": {}}
    for name, f in variants.items():
        try:
            _run(f, [(a,)], warmup)
            jax.block_until_ready(a)
            t = clock.time(f, [(a,)], calls)
        except ValueError as err:  # e.g. XLA returned the input without a kernel
            out["variants"][name] = {"error": str(err)}
            continue
        us = float(np.median(t.per_call_us)) if t.per_call_us else t.mean_us
        if us <= 0:
            out["variants"][name] = {"error": "no device time recorded"}
            continue
        out["variants"][name] = {"time_us": us, "bytes_per_s": 2 * 4 * n / (us * 1e-6), "kernels": t.kernels}
    good = [v["bytes_per_s"] for v in out["variants"].values() if "bytes_per_s" in v]
    if not good:
        raise RuntimeError(f"could not measure copy bandwidth: {out['variants']}")
    out["bytes_per_s"] = max(good)
    return out
