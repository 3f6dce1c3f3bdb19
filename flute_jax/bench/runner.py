"""The sweep: for each benchmark point, time every method on its own weight sets.

How one method is timed at one point (``measure``):

1. Weight sets. ``n_sets`` distinct random sets (x, weights) are made on the device so
   that the weight bytes streamed between two uses of the same set are at least
   ``stream_factor`` x L2 (8 x 50 MB on an H100): every call reads its weights from HBM,
   as in a real forward pass, never from L2.
2. One jitted function, compiled once, called once per set in rotation. Each call is
   one XLA execution holding exactly one matmul with its own x and its own weight, so
   XLA cannot merge dots that share an operand (it would if one jit held one x with
   several weights, or one weight with several x's, and the timing would then be of a
   wider GEMM). Each call being a separate execution also means there is no scan or
   dynamic-slice that might copy a weight before the matmul.
3. Warm-up calls (compilation, autotuning, first-touch), then ``rounds`` x ``calls``
   timed calls in one trace; the reported time is the median over all calls, with
   each round's median kept so the spread between rounds shows the noise.
4. Optional check: y of the first set against float64 ``x @ W`` on the host, W by the
   method's own definition (its first 512 output columns, all of K, up to 16 rows of x;
   cheap for the largest shapes, and the dequantize jit is shared by all M).

``xla_dot`` / ``xla_int4`` / ``naive_lut`` results do not depend on all of
(bits, group size), see :mod:`.methods`; they are measured once and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import hlo, methods, timing

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}
CHECK_COLUMNS = 512  # the check covers all of K, these output columns and rows
CHECK_ROWS = 16


@dataclasses.dataclass
class Settings:
    calls: int = 100  # timed calls per round
    rounds: int = 2
    warmup: int = 5
    stream_factor: float = 8.0  # weight bytes between two uses of a set, in units of L2
    min_sets: int = 2
    check: bool = True
    time_budget_s: Optional[float] = None  # stop starting new points after this long
    copy_bytes: Optional[int] = None  # buffer of the bandwidth measurement
    l2_bytes: Optional[int] = None  # overrides the L2 size read from the device


def sets_needed(set_weight_bytes: int, l2: int, settings: Settings) -> int:
    """Distinct weight sets so the bytes streamed between reuses of one set exceed factor x L2."""
    if l2 <= 0:
        return settings.min_sets
    return max(settings.min_sets, math.ceil(settings.stream_factor * l2 / max(set_weight_bytes, 1)) + 1)


def _summary(per_call: Optional[list], mean: float, rounds: int) -> dict:
    if per_call is None:
        return {"time_us": mean, "mean_us": mean, "round_medians_us": None, "spread_pct": None}
    a = np.asarray(per_call, np.float64).reshape(rounds, -1)
    med = [float(np.median(r)) for r in a]
    t = float(np.median(a))
    return {
        "time_us": t,
        "mean_us": float(a.mean()),
        "min_us": float(a.min()),
        "p90_us": float(np.percentile(a, 90)),
        "round_medians_us": med,
        "spread_pct": 100.0 * (max(med) - min(med)) / t if t > 0 else None,
    }


@functools.lru_cache(maxsize=64)
def _reference_fn(method_name: str, k: int, n: int, bits: int, group_size: int, dtype: str, n0: int):
    # One jit per weight shape, shared by every M: the check costs no compile per point.
    c = methods.Config(1, k, n, bits, group_size, dtype)
    return jax.jit(methods.REGISTRY[method_name].reference(c, n0))


def _check(method: methods.Method, c: methods.Config, fn: Callable, args: tuple) -> dict:
    """Relative error of y[:rows, :n0] against float64 x @ W (W by the method's own definition)."""
    n0, rows = min(c.n, CHECK_COLUMNS), min(c.m, CHECK_ROWS)
    w = np.asarray(_reference_fn(method.name, c.k, c.n, c.bits, c.group_size, c.dtype, n0)(*args[1:]), np.float64)
    x = np.asarray(args[0][:rows].astype(jnp.float32), np.float64)
    y = np.asarray(fn(*args)[:rows, :n0].astype(jnp.float32), np.float64)
    ref = x @ w
    err = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
    tol = TOLERANCE[c.dtype]
    return {"rel_error": err, "tolerance": tol, "rows": rows, "columns": n0,
            "ok": bool(np.isfinite(err) and err <= tol)}


def measure(method: methods.Method, c: methods.Config, clock, l2: int, settings: Settings) -> dict:
    """Time ``method`` at point ``c``; returns every number of that measurement."""
    t_start = time.perf_counter()
    make = functools.partial(method.make, c=c)
    shapes = jax.eval_shape(make, jax.random.key(0))
    weight_bytes = sum(methods.array_bytes(s) for s in shapes[1:])
    x_bytes = methods.array_bytes(shapes[0])
    n_sets = sets_needed(weight_bytes, l2, settings)
    seed = zlib.crc32(repr((method.name, c.m, c.k, c.n, c.bits, c.group_size, c.dtype)).encode())
    keys = jax.random.split(jax.random.key(seed), n_sets)  # deterministic, distinct per point
    arg_sets = [make(k) for k in keys]
    jax.block_until_ready(arg_sets)
    t_data = time.perf_counter()

    fn = jax.jit(method.fn(c))
    compiled = fn.lower(*arg_sets[0]).compile()  # fn's first call reuses this executable
    y_shape = jax.eval_shape(fn, *shapes)
    y_bytes = methods.array_bytes(y_shape)
    t_compile = time.perf_counter()

    check = _check(method, c, fn, arg_sets[0]) if settings.check else None
    jax.block_until_ready(timing._run(fn, arg_sets, max(settings.warmup, 1)))
    t_warm = time.perf_counter()

    n_calls = settings.rounds * settings.calls
    times = clock.time(fn, arg_sets, n_calls)
    t_end = time.perf_counter()
    del arg_sets

    rec = {
        "method": method.name,
        **_summary(times.per_call_us, times.mean_us, settings.rounds),
        "n_calls": n_calls,
        "n_sets": n_sets,
        "weight_bytes": weight_bytes,
        "roofline_bytes": weight_bytes + x_bytes + y_bytes,
        "grouping": times.grouping,
        "kernels": times.kernels,
        "hlo_ops": hlo.entry_ops(compiled.as_text()),
        "check": check,
        "seconds": {
            "data": t_data - t_start,
            "compile": t_compile - t_data,
            "check_warmup": t_warm - t_compile,
            "timed": t_end - t_warm,
        },
    }
    return rec


def configs_for(shapes, ms, bits_list, group_sizes, dtypes) -> list[methods.Config]:
    """The sweep's points, ordered so that one (dtype, shape, M) is finished before the next."""
    return [
        methods.Config(m, s.k, s.n, b, g, d, s.label)
        for d in dtypes
        for s in shapes
        for m in ms
        for g in group_sizes
        for b in bits_list
    ]


def run(
    configs: list[methods.Config],
    method_names: list[str],
    device: jax.Device,
    clock,
    settings: Settings,
    progress: Optional[Callable] = None,
    on_point: Optional[Callable] = None,
) -> dict:
    """Copy bandwidth, then every (point, method). Returns ``{"bandwidth", "results", "complete"}``.

    ``progress(total)`` may return an object with ``update(n)``/``set_postfix_str``/``close``
    (a tqdm bar). ``on_point(partial)`` is called after each point (the CLI rewrites its
    JSON then, so a killed run keeps what it measured). A measurement that raises is
    recorded with its error and the sweep goes on. Stops starting new points when
    ``settings.time_budget_s`` is spent.
    """
    start = time.perf_counter()
    l2 = settings.l2_bytes if settings.l2_bytes is not None else _l2_of(device)
    with jax.default_device(device):
        copy_bytes = settings.copy_bytes or (2**30 if device.platform == "gpu" else 2**26)
        bandwidth = timing.copy_bandwidth(clock, copy_bytes, max(10, settings.calls // 2))
        bw = bandwidth["bytes_per_s"]
        cache: dict = {}
        results, complete = [], True
        tasks = [(c, name) for c in configs for name in method_names]
        bar = progress(len(tasks)) if progress else None
        try:
            for c in configs:
                if settings.time_budget_s is not None and time.perf_counter() - start > settings.time_budget_s:
                    complete = False
                    break
                point = {**dataclasses.asdict(c), "methods": {}}
                for name in method_names:
                    method = methods.REGISTRY[name]
                    key = method.cache_key(c)
                    if bar is not None:
                        bar.set_postfix_str(f"{c.shape_name or f'{c.k}x{c.n}'} M={c.m} b={c.bits} {name}")
                    if key not in cache:
                        try:
                            cache[key] = measure(method, c, clock, l2, settings)
                        except Exception as err:  # noqa: BLE001  (one failure must not lose the sweep)
                            cache[key] = {"method": name, "time_us": None, "error": f"{type(err).__name__}: {err}"}
                    rec = dict(cache[key])
                    if rec.get("time_us"):
                        rec["roofline_us"] = rec["roofline_bytes"] / bw * 1e6
                        rec["roofline_fraction"] = rec["roofline_us"] / rec["time_us"]
                    point["methods"][name] = rec
                    if bar is not None:
                        bar.update(1)
                _add_ratios(point, bw)
                results.append(point)
                if on_point is not None:
                    on_point({"bandwidth": bandwidth, "results": results, "complete": False,
                              "elapsed_s": time.perf_counter() - start})
        except KeyboardInterrupt:
            complete = False
        finally:
            if bar is not None:
                bar.close()
    return {"bandwidth": bandwidth, "results": results, "complete": complete,
            "elapsed_s": time.perf_counter() - start}


def _l2_of(device) -> int:
    from .device import l2_bytes

    return l2_bytes(device)[0]


def _add_ratios(point: dict, bw: float) -> None:
    """Speed-up over the dtype's dot, and the speed-up the bytes allow at best."""
    ms = point["methods"]
    dot = (ms.get("xla_dot") or {}).get("time_us")
    for rec in ms.values():
        rec["speedup_vs_dot"] = dot / rec["time_us"] if dot and rec.get("time_us") else None
    if "flute" in ms and "roofline_bytes" in ms["flute"]:
        k, n, m = point["k"], point["n"], point["m"]
        item = jnp.dtype(point["dtype"]).itemsize
        dense = item * (k * n + m * k + m * n)
        point["speedup_ceiling"] = dense / ms["flute"]["roofline_bytes"]
    else:
        point["speedup_ceiling"] = None
