"""The tuning cache: measured GPU path choices that refine :mod:`flute_jax.dispatch`'s rule.

``python -m flute_jax.tune`` (:mod:`flute_jax.tune`) times the GPU paths of ``qgemm``
(``mma``, ``wgmma``, ``dense``) on the GPU it runs on. It writes the fastest path per
problem into a JSON file, and the CUDA lowering then reads that file. Tuning is
optional: without the file the rule in :mod:`flute_jax.dispatch` decides. Every path
computes the same function within the format's tolerances, so a cache entry can change
speed only, never the result beyond those tolerances.

Where the file is: ``$FLUTE_JAX_TUNING_CACHE`` if set (``none`` turns the cache off),
else ``$XDG_CACHE_HOME/flute_jax/tuning-v1.json`` (``~/.cache/...`` by default).

The format (version 1)::

    {"version": 1,
     "entries": [{"device_kind": "NVIDIA H200", "bits": 4, "group_size": 128,
                  "dtype": "bfloat16", "k": 8192, "n": 57344, "m": 512,
                  "path": "wgmma", "times_us": {"wgmma": 1010.2, "dense": 1042.7},
                  "rule_path": "wgmma", "flute_jax": "0.1.0", "jax": "0.11.2",
                  "date": "2026-11-30"}, ...]}

``group_size`` is the resolved number of K rows per scale group (K for a single group),
and ``k`` and ``n`` are the shape one device sees (a tensor-parallel shard's, under
sharding). A call takes the entry of its GPU kind, bits, group size, dtype, K and N
measured at the M nearest to its own on a log scale, if that M is within a factor of
two. Otherwise it takes the rule's path. A file with another version, or one that does
not parse, is ignored with one warning. It never fails a trace.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
import warnings
from typing import Iterable, Optional

VERSION = 1
ENV = "FLUTE_JAX_TUNING_CACHE"
PATHS = ("mma", "wgmma", "dense")  # qgemm's GPU paths (flute_jax.dispatch)
# A call uses an entry measured at an M within this factor of its own.
M_REACH = 2.0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured choice: the fastest path for one problem on one kind of GPU."""

    device_kind: str
    bits: int
    group_size: int  # K rows per scale group (K for a single group)
    dtype: str  # x's dtype name
    k: int
    n: int
    m: int
    path: str
    times_us: dict  # path -> device time per call, for the paths measured
    rule_path: str = ""  # what dispatch's rule picks for this problem
    flute_jax: str = ""
    jax: str = ""
    date: str = ""

    @property
    def problem(self) -> tuple:
        """The key that a call must match exactly (all but M)."""
        return (self.device_kind, self.bits, self.group_size, self.dtype, self.k, self.n)


def default_location() -> Optional[str]:
    """The cache file's path, or None when ``$FLUTE_JAX_TUNING_CACHE`` is ``none``."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return None if env.strip().lower() == "none" else os.path.expanduser(env.strip())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flute_jax", f"tuning-v{VERSION}.json")


def _entry_from(raw: dict) -> Entry:
    if not isinstance(raw, dict):
        raise ValueError(f"an entry is not an object: {raw!r}")
    fields = {f.name for f in dataclasses.fields(Entry)}
    try:
        e = Entry(**{key: value for key, value in raw.items() if key in fields})
    except TypeError as err:  # a required field missing
        raise ValueError(f"bad entry {raw!r}: {err}") from None
    if e.path not in PATHS:
        raise ValueError(f"path {e.path!r} is not one of {PATHS}")
    ints = (e.bits, e.group_size, e.k, e.n, e.m)
    if not all(isinstance(v, int) and v > 0 for v in ints) or not isinstance(e.device_kind, str):
        raise ValueError(f"bad entry {raw!r}")
    return e


def read(path: str) -> list[Entry]:
    """The entries of the file at ``path``. Raises ValueError if it is not a version-1 cache."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        found = doc.get("version") if isinstance(doc, dict) else None
        raise ValueError(f"not a version-{VERSION} flute_jax tuning cache (version {found!r})")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise ValueError("'entries' is not a list")
    return [_entry_from(raw) for raw in entries]


def write(path: str, entries: Iterable[Entry]) -> None:
    """Writes ``entries`` (sorted, one per problem and M) to ``path`` atomically."""
    ordered = sorted(merge((), entries), key=lambda e: (e.problem, e.m))
    doc = {"version": VERSION, "entries": [dataclasses.asdict(e) for e in ordered]}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise


def merge(old: Iterable[Entry], new: Iterable[Entry]) -> list[Entry]:
    """``old`` with the entries of ``new`` added, replacing any for the same problem and M."""
    merged = {(e.problem, e.m): e for e in old}
    merged.update({(e.problem, e.m): e for e in new})
    return list(merged.values())


def nearest(entries: Iterable[Entry], problem: tuple, m: int) -> Optional[Entry]:
    """The entry for ``problem`` measured at the M nearest to ``m`` (log scale) within
    ``M_REACH``; on a tie, the one measured at the smaller M. None if there is none."""
    best, best_key = None, None
    for e in entries:
        if e.problem != problem:
            continue
        distance = abs(math.log2(m / e.m))
        if distance > math.log2(M_REACH) + 1e-12:
            continue
        key = (distance, e.m)
        if best_key is None or key < best_key:
            best, best_key = e, key
    return best


# The parsed file, kept while its path, size and modification time stay the same (a
# tuning run in the same process is seen by the next trace).
_lock = threading.Lock()
_loaded: dict = {"stamp": None, "entries": []}
_warned: set = set()


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns)


def entries() -> list[Entry]:
    """The entries of the cache file in use (``default_location()``); [] if there is none."""
    path = default_location()
    stamp = _stamp(path) if path else None
    if stamp is None:
        return []
    with _lock:
        if _loaded["stamp"] != stamp:
            try:
                parsed = read(path)
            except (OSError, ValueError, TypeError) as err:
                if stamp not in _warned:
                    _warned.add(stamp)
                    warnings.warn(f"flute_jax: ignoring the tuning cache {path}: {err}", RuntimeWarning, stacklevel=3)
                parsed = []
            _loaded["stamp"], _loaded["entries"] = stamp, parsed
        return _loaded["entries"]


def lookup(device_kind: str, bits: int, group_size: int, dtype: str, k: int, n: int, m: int) -> Optional[str]:
    """The tuned path for a call, or None (then the rule decides)."""
    if not device_kind:
        return None
    e = nearest(entries(), (device_kind, bits, group_size, dtype, k, n), m)
    return e.path if e is not None else None
