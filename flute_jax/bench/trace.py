"""Reading device time out of a JAX profiler trace (``perfetto_trace.json.gz``).

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes a Chrome/Perfetto JSON
trace under ``dir/plugins/profile/<run>/perfetto_trace.json.gz``::

    {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(...)"}},
      {"ph": "X", "pid": 1, "tid": 7, "ts": 12.5, "dur": 3.2, "name": "kernel_name", "args": {...}},
      ...]}

Times are in microseconds. On a GPU, the process named ``/device:GPU:0`` holds one
thread ("line") per CUDA stream with the kernels and memcpys as complete (``'X'``)
events. The profiler may add derived lines to that process ("XLA Modules", "XLA Ops",
"Steps", ...) whose events span the kernels again; summing those would count time twice,
so only stream lines are kept (or, if no line is called "Stream ...", every line that is
not a known derived one). The functions here are pure so the tests can feed them
synthetic traces in this format.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
from collections import Counter
from typing import Optional, Sequence

# Lines that xprof derives from others (their events overlap the kernels).
DERIVED_LINES = (
    "XLA Modules",
    "XLA Ops",
    "XLA TraceMe",
    "Steps",
    "Framework Ops",
    "Framework Name Scope",
    "TensorFlow Ops",
    "TensorFlow Name Scope",
    "Source code",
    "Launch Stats",
)


def find_trace_file(log_dir: str) -> str:
    """The newest ``perfetto_trace.json.gz`` (else ``*.trace.json.gz``) under ``log_dir``."""
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:  # the perfetto file is this one minus its "metadata" key
        paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {log_dir}: was jax.profiler.trace called with "
            "create_perfetto_trace=True?"
        )
    return max(paths, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
    """The ``traceEvents`` list of a (gzipped) JSON trace."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: not a Chrome/Perfetto trace (no traceEvents list)")
    return events


def process_ids(events: Sequence[dict], process_name: str) -> list[int]:
    """pids whose ``process_name`` metadata is ``process_name`` (a trailing " (...)" is allowed)."""
    pids = []
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            name = str(e.get("args", {}).get("name", ""))
            if name == process_name or name.split(" ")[0] == process_name:
                pids.append(e.get("pid"))
    return pids


def thread_names(events: Sequence[dict], pid: int) -> dict:
    """``{tid: name}`` of the threads (lines) of process ``pid``."""
    return {
        e.get("tid"): str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") == pid
    }


@dataclasses.dataclass
class DeviceEvents:
    """Complete events of one device, sorted by start time, and the lines they came from."""

    events: list  # dicts with at least name, ts, dur
    lines: list  # names of the lines (threads) that were kept


def device_events(events: Sequence[dict], process_name: str = "/device:GPU:0") -> DeviceEvents:
    """Kernel/memcpy events ('X') of ``process_name``, derived lines removed, sorted by ts.

    Raises ValueError if the process is not in the trace (e.g. the profiler saw no GPU).
    """
    pids = set(process_ids(events, process_name))
    if not pids:
        names = sorted(
            {str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"}
        )
        raise ValueError(f"no process {process_name!r} in the trace; processes: {names}")
    names = {}
    for pid in pids:
        names.update({(pid, tid): n for tid, n in thread_names(events, pid).items()})
    streams = {key for key, n in names.items() if n.startswith("Stream")}
    if streams:
        keep = lambda key: key in streams  # noqa: E731
    else:
        keep = lambda key: not any(names.get(key, "").startswith(d) for d in DERIVED_LINES)  # noqa: E731
    kept = [
        e
        for e in events
        if e.get("ph") == "X" and e.get("pid") in pids and keep((e.get("pid"), e.get("tid")))
    ]
    kept.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    lines = sorted({names.get((e.get("pid"), e.get("tid")), f"tid {e.get('tid')}") for e in kept})
    return DeviceEvents(kept, lines)


@dataclasses.dataclass
class CallTimes:
    """Device time of ``n_calls`` consecutive calls of one function.

    per_call_us: device time of each call: the time the device was busy with its events
      (the union of their intervals; the sum of their durations when none overlap, and
      overlapping kernels, e.g. a programmatic dependent launch, counted once, also across
      calls: a stretch that overlaps the previous call is that call's); None when
      the events could not be split into calls (then only ``mean_us`` is known).
    kernels: event names of one call, in start order.
    grouping: "per-call" or why the split failed.
    """

    per_call_us: Optional[list]
    mean_us: float
    kernels: list
    grouping: str


def busy_us(events: Sequence[dict], since: float = -math.inf) -> float:
    """Length of the union of the events' [ts, ts + dur] intervals (us), from ``since`` on."""
    total, end = 0.0, since
    for e in sorted(events, key=lambda e: float(e["ts"])):
        start, stop = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def split_calls(events: Sequence[dict], n_calls: int) -> CallTimes:
    """Split time-sorted device events of ``n_calls`` identical calls into per-call sums.

    Every call of one compiled function launches the same kernels, and the calls run one
    after another on the stream, so the sorted events fall into ``n_calls`` consecutive
    chunks of equal length with the same kernel names (compared as multisets, so kernels
    on several streams may interleave within a call). If that does not hold, only the
    mean over all calls is returned, and ``grouping`` says why.
    """
    if n_calls < 1:
        raise ValueError(f"n_calls must be >= 1, got {n_calls}")
    if not events:
        raise ValueError("no device events in the trace: nothing ran on the device while tracing")
    mean = busy_us(events) / n_calls
    if len(events) % n_calls:
        return CallTimes(None, mean, [e["name"] for e in events[: max(1, len(events) // n_calls)]],
                         f"{len(events)} events are not a multiple of {n_calls} calls")
    per = len(events) // n_calls
    chunks = [events[i * per : (i + 1) * per] for i in range(n_calls)]
    signature = Counter(e["name"] for e in chunks[0])
    for i, chunk in enumerate(chunks[1:], 1):
        if Counter(e["name"] for e in chunk) != signature:
            return CallTimes(None, mean, [e["name"] for e in chunks[0]], f"call {i} launched other kernels than call 0")
    # A call's first kernel may start before the previous call's last one ends (a
    # programmatic dependent launch): that stretch is the previous call's, so that the
    # calls' times add up to the time the device was busy with them all.
    per_call, end = [], -math.inf
    for chunk in chunks:
        per_call.append(busy_us(chunk, since=end))
        end = max(end, max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in chunk))
    return CallTimes(per_call, mean, [e["name"] for e in chunks[0]], "per-call")
