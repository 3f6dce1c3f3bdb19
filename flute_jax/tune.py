"""``python -m flute_jax.tune``: measure qgemm's GPU paths and store the fastest per problem.

    python -m flute_jax.tune --shapes llama3-8b,llama3-70b --m 32,64,128,256,512,1024,4096
    python -m flute_jax.tune --kn 4096x14336 --tp 1,2 --m 128,512 --bits 3,4 --group-size 64,128
    python -m flute_jax.tune --show              # the cache file in use and its entries

For each problem (K, N, bits, group size, dtype) and each M it times every path that
applies on this GPU: ``mma`` (decode kernel; up to ``MMA_MAX_M`` rows, beyond which it
re-reads the weight once per 32 rows and cannot win), ``wgmma`` (tile kernel, Hopper
only) and ``dense`` (dequantize once + XLA's dot). It uses the benchmark's method:
device time from a profiler trace, weights rotated beyond L2, y checked against a
float64 reference. A path whose check fails, or that errors, is never chosen. A path
other than the rule's must beat the rule's by ``--margin`` (default 3%), so noise does
not flip a choice. The results are merged into the tuning cache
(:mod:`flute_jax.tuning`), which the CUDA lowering reads when it picks a path.

Entries apply to the GPU kind they were measured on, and to calls at an M within a
factor of two of a measured one, so tune the M values your workload runs (decode
batch sizes, prefill chunk lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from typing import Callable, Optional, Sequence

from . import dispatch, tuning

MMA_MAX_M = 512  # the decode kernel is timed up to here (2 x dispatch.KERNEL_MAX_M, rounded up)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One point to tune: an ``[m, k] x [k, n]`` qgemm."""

    m: int
    k: int
    n: int
    bits: int
    group_size: int  # as the user gives it: -1 for one group over K
    dtype: str
    label: str = ""

    @property
    def group_rows(self) -> int:
        return self.k if self.group_size == -1 else self.group_size


def candidate_paths(m: int, wgmma: bool) -> list[str]:
    """The paths worth timing at M on a GPU with or without the tile kernel."""
    paths = ["mma"] if m <= MMA_MAX_M else []
    if wgmma:
        paths.append("wgmma")
    return paths + ["dense"]


def choose(times_us: dict, rule: str, margin: float) -> Optional[str]:
    """The path to store: the fastest measured one, unless the rule's path is within
    ``margin`` of it (then the rule's). None if nothing was measured."""
    valid = {p: t for p, t in times_us.items() if t is not None and t > 0}
    if not valid:
        return None
    best = min(valid, key=lambda p: (valid[p], p != rule))
    if rule in valid and valid[rule] <= valid[best] * (1.0 + margin):
        return rule
    return best


def tune(
    problems: Sequence[Problem],
    measure: Callable[[Problem, str], Optional[float]],
    *,
    device_kind: str,
    wgmma: bool,
    margin: float = 0.03,
    versions: Optional[dict] = None,
    on_entry: Optional[Callable[[tuning.Entry], None]] = None,
) -> list[tuning.Entry]:
    """Times each problem's candidate paths with ``measure(problem, path)`` (device time
    in us, or None when the path failed) and returns one cache entry per problem."""
    versions = versions or {}
    out = []
    for pr in problems:
        rule = dispatch.rule_path(pr.m, pr.k, pr.n, pr.bits, wgmma=wgmma, device_kind=device_kind)
        times = {path: measure(pr, path) for path in candidate_paths(pr.m, wgmma)}
        path = choose(times, rule, margin)
        if path is None:
            continue
        entry = tuning.Entry(
            device_kind=device_kind, bits=pr.bits, group_size=pr.group_rows, dtype=pr.dtype, k=pr.k, n=pr.n,
            m=pr.m, path=path, times_us={p: t for p, t in times.items() if t is not None}, rule_path=rule,
            flute_jax=versions.get("flute_jax", ""), jax=versions.get("jax", ""),
            date=datetime.date.today().isoformat(),
        )
        out.append(entry)
        if on_entry is not None:
            on_entry(entry)
    return out


# A kernel that a forced path never launches: seeing it means the force did not take.
# (Shapes the FLUTE kernels do not take run the simple kernel on both kernel paths.)
_OTHER_PATHS_KERNEL = {"mma": "FluteTileKernel", "wgmma": "FluteQgemmKernel", "dense": "Flute"}


def _bench_measure(clock, l2: int, settings) -> Callable[[Problem, str], Optional[float]]:
    """``measure`` by the benchmark's runner: the flute method with the path forced."""
    import jax

    from .bench import methods, runner

    def measure(pr: Problem, path: str) -> Optional[float]:
        c = methods.Config(pr.m, pr.k, pr.n, pr.bits, pr.group_size, pr.dtype, pr.label)
        jax.clear_caches()  # the path is chosen at lowering: no lowering of another path may be reused
        try:
            with dispatch.force_path(path):
                rec = runner.measure(methods.REGISTRY["flute"], c, clock, l2, settings)
        except Exception as err:  # noqa: BLE001  (a failing path is reported and never chosen)
            print(f"  {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        check = rec.get("check")
        if check is not None and not check["ok"]:
            print(f"  {path}: check failed (relative error {check['rel_error']:.3g})", file=sys.stderr)
            return None
        kernels = " ".join(rec.get("kernels") or [])
        if kernels and _OTHER_PATHS_KERNEL[path] in kernels:
            print(f"  {path}: the trace shows another path's kernel ({kernels[:120]})", file=sys.stderr)
            return None
        return rec["time_us"]

    return measure


def _format(entry: tuning.Entry) -> str:
    times = "  ".join(f"{p} {entry.times_us[p]:9.1f}" for p in tuning.PATHS if p in entry.times_us)
    gain = ""
    if entry.rule_path in entry.times_us and entry.path != entry.rule_path:
        gain = f"  ({entry.times_us[entry.rule_path] / entry.times_us[entry.path]:.2f}x over the rule's)"
    return (f"{entry.k:>6}x{entry.n:<6} M={entry.m:<5} b{entry.bits} g{entry.group_size:<5} {entry.dtype:<9} "
            f"{times}  -> {entry.path:<5} rule {entry.rule_path}{gain}")


def parser() -> argparse.ArgumentParser:
    from .bench.cli import DTYPES, GROUP_SIZES, _choice_list, _int_list, _kn
    from .bench.shapes import LLAMA3

    p = argparse.ArgumentParser(prog="python -m flute_jax.tune",
                                description="Measure qgemm's GPU paths on this GPU and store the fastest per problem "
                                            "in the tuning cache, which the CUDA lowering reads.")
    p.add_argument("--shapes", type=_choice_list("--shapes", tuple(LLAMA3)), default=[],
                   help="Llama-3 models whose linear layers to tune")
    p.add_argument("--tp", type=_int_list("--tp", (1, 2, 4, 8)), default=[1], help="tensor-parallel shards of --shapes")
    p.add_argument("--kn", type=_kn, default=[], help="explicit weight shapes KxN, e.g. 4096x4096")
    p.add_argument("--m", type=_int_list("--m"), default=[32, 64, 128, 256, 512, 1024, 4096],
                   help="tokens M (default 32,64,128,256,512,1024,4096)")
    p.add_argument("--bits", type=_int_list("--bits", (2, 3, 4)), default=[4], help="2,3,4 (default 4)")
    p.add_argument("--group-size", type=_int_list("--group-size", GROUP_SIZES), default=[128],
                   help="32,64,128,256 or -1 (default 128)")
    p.add_argument("--dtype", type=_choice_list("--dtype", DTYPES), default=["bfloat16"],
                   help="bfloat16,float16 (default bfloat16)")
    p.add_argument("--margin", type=float, default=0.03,
                   help="how much faster than the rule's path another must be (default 0.03)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per round (2 rounds)")
    p.add_argument("--cache", default=None, help=f"the cache file (default: ${tuning.ENV}, else ~/.cache/...)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.add_argument("--show", action="store_true", help="print the cache file's entries and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    path = args.cache or tuning.default_location()
    if path is None and (args.show or not args.dry_run):
        p.error(f"${tuning.ENV} is 'none' and no --cache was given: nowhere to read or write")
    if args.show:
        try:
            found = tuning.read(path)
        except FileNotFoundError:
            print(f"{path}: no tuning cache")
            return 0
        except ValueError as err:
            p.error(f"{path}: {err}")
        print(f"{path}: {len(found)} entries")
        for e in found:
            print(f"  {e.device_kind:<24} {_format(e)}")
        return 0
    if args.margin < 0:
        p.error("--margin must be >= 0")
    if args.calls < 1:
        p.error("--calls must be >= 1")

    import jax

    from . import __version__, _ffi
    from .bench import device as device_mod
    from .bench import runner, timing
    from .bench.shapes import resolve_shapes

    try:
        dev = device_mod.pick_device("gpu")
    except (RuntimeError, ValueError) as err:
        p.error(f"tuning needs a GPU: {err}")
    if not _ffi.with_cuda:
        p.error("this build of flute_jax has no CUDA kernels")
    try:
        shapes = resolve_shapes(args.shapes or (["llama3-8b"] if not args.kn else []), args.tp, args.kn)
    except ValueError as err:
        p.error(str(err))
    problems = [Problem(m, s.k, s.n, b, g, d, s.label) for d in args.dtype for s in shapes for g in args.group_size
                for b in args.bits for m in args.m]
    clock = timing.make_clock("profiler", dev)
    settings = runner.Settings(calls=args.calls, rounds=2, warmup=3)
    kind = dev.device_kind
    wgmma = _ffi.cuda_has_wgmma()
    print(f"tuning {len(problems)} problems on {kind} (tile kernel: {'yes' if wgmma else 'no'}); device us per call:")

    old: list = []
    if not args.dry_run:
        try:
            old = tuning.read(path)
        except FileNotFoundError:
            pass
        except ValueError as err:
            print(f"replacing {path}: {err}", file=sys.stderr)
    done: list = []

    def record(e: tuning.Entry) -> None:
        print(_format(e), flush=True)
        done.append(e)
        if not args.dry_run:  # after every problem: an interrupted run keeps what it measured
            tuning.write(path, tuning.merge(old, done))

    with jax.default_device(dev):
        tune(problems, _bench_measure(clock, runner._l2_of(dev), settings), device_kind=kind, wgmma=wgmma,
             margin=args.margin, versions={"flute_jax": __version__, "jax": jax.__version__}, on_entry=record)
    if not args.dry_run:
        print(f"wrote {len(done)} entries to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
