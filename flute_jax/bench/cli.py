"""``python -m flute_jax.bench``: argument parsing and the two commands.

    python -m flute_jax.bench --shapes llama3-8b --tp 1,2 --m 1,16 --bits 2,3,4 --json r.json --plot r.png
    python -m flute_jax.bench --kn 4096x4096,8192x28672 --m 1 --methods flute,xla_dot
    python -m flute_jax.bench report r.json [more.json ...] [--plot r.png] > BENCHMARKS.md
    python -m flute_jax.bench compare before.json after.json [--labels v9,v10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

from . import report
from .methods import METHODS
from .shapes import LLAMA3, Shape, parse_kn, resolve_shapes

CPU_DEFAULT_KN = "512x768,1024x512"
DTYPES = ("bfloat16", "float16")
GROUP_SIZES = (32, 64, 128, 256, -1)


def _int_list(what: str, allowed: Optional[Sequence[int]] = None, minimum: int = 1):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{what} is empty")
        for v in values:
            if allowed is not None and v not in allowed:
                raise argparse.ArgumentTypeError(f"{what} must be among {list(allowed)}, got {v}")
            if allowed is None and v < minimum:
                raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {v}")
        return list(dict.fromkeys(values))

    return parse


def _choice_list(what: str, allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{what} must be among {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def _kn(text: str) -> list[Shape]:
    try:
        return parse_kn(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flute_jax.bench",
        description="Time flute_jax.qgemm against XLA's dot, XLA int4 dequantize+dot and a naive LUT "
        "gather+dot on the same shapes (device time from a profiler trace on GPU, wall clock on CPU). "
        "'python -m flute_jax.bench report FILE.json ...' turns results into Markdown, "
        "'python -m flute_jax.bench compare A.json B.json ...' puts runs side by side.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--shapes", type=_choice_list("--shapes", tuple(LLAMA3)), default=[],
                   help=f"Llama-3 presets (qkv, o, fused gate/up, down): {', '.join(LLAMA3)}")
    g.add_argument("--tp", type=_int_list("--tp", (1, 2, 4, 8)), default=[1],
                   help="tensor-parallel degrees for --shapes: N of qkv and gate/up, K of o and down split (default 1)")
    g.add_argument("--kn", type=_kn, default=[], help="explicit weight shapes KxN, e.g. 4096x4096,8192x28672")
    g.add_argument("--m", type=_int_list("--m"), default=[1, 16], help="tokens M (default 1,16)")
    g.add_argument("--bits", type=_int_list("--bits", (2, 3, 4)), default=[4], help="2,3,4 (default 4)")
    g.add_argument("--group-size", type=_int_list("--group-size", GROUP_SIZES), default=[128],
                   help="rows of K per scale (32,64,128,256,-1; default 128)")
    g.add_argument("--dtype", type=_choice_list("--dtype", DTYPES), default=["bfloat16"],
                   help="activation dtype(s): bfloat16,float16 (default bfloat16)")
    g.add_argument("--methods", type=_choice_list("--methods", METHODS), default=list(METHODS),
                   help=f"which to run (default all): {','.join(METHODS)}")
    t = p.add_argument_group("how to time")
    t.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto")
    t.add_argument("--clock", choices=("auto", "profiler", "wall"), default="auto",
                   help="profiler: device time from a JAX trace (GPU); wall: wall clock per call (auto: by platform)")
    t.add_argument("--calls", type=_int_list("--calls"), default=[100], help="timed calls per round (default 100)")
    t.add_argument("--rounds", type=_int_list("--rounds"), default=[2], help="rounds; their spread is the noise (default 2)")
    t.add_argument("--warmup", type=_int_list("--warmup"), default=[5], help="untimed calls first (default 5)")
    t.add_argument("--stream-factor", type=float, default=8.0,
                   help="weight bytes streamed between reuses of one weight set, in units of L2 (default 8)")
    t.add_argument("--l2-mib", type=float, default=None, help="override the L2 size read from the device")
    t.add_argument("--copy-mib", type=float, default=None, help="buffer of the copy-bandwidth test (default 1024 GPU, 64 CPU)")
    t.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check of each method against a float64 host reference")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new point after this many seconds; partial results are written")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every number and the environment to FILE")
    o.add_argument("--plot", metavar="FILE.png", help="speed-up against M per bits (matplotlib)")
    o.add_argument("--markdown", action="store_true", help="print Markdown (BENCHMARKS.md) instead of the table")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flute_jax.bench report",
                                description="Markdown tables (BENCHMARKS.md) from benchmark JSON files.")
    p.add_argument("files", nargs="+", help="JSON files written by --json")
    p.add_argument("--plot", metavar="FILE.png", help="also write the speed-up plot")
    p.add_argument("--text", action="store_true", help="the terminal table instead of Markdown")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flute_jax.bench compare",
                                description="Runs side by side: per point, a method's time and speed-up in each "
                                "run and its gain over the first run, with geometric means per M.")
    p.add_argument("files", nargs="+", help="JSON files written by --json; the first is the baseline")
    p.add_argument("--labels", type=lambda t: [v.strip() for v in t.split(",")], default=None,
                   help="comma-separated names of the runs (default: the file names)")
    p.add_argument("--method", choices=[m for m in METHODS if m != "xla_dot"], default="flute")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    return _run(argv)


def _compare(argv: list[str]) -> int:
    p = compare_parser()
    args = p.parse_args(argv)
    labels = args.labels or [f.rsplit("/", 1)[-1].removesuffix(".json") for f in args.files]
    if len(labels) != len(args.files):
        p.error(f"--labels names {len(labels)} runs for {len(args.files)} files")
    try:
        docs = report.load(args.files)
    except (OSError, ValueError) as err:
        p.error(str(err))
    print(report.compare(docs, labels, args.method))
    return 0


def _report(argv: list[str]) -> int:
    p = report_parser()
    args = p.parse_args(argv)
    try:
        docs = report.load(args.files)
    except (OSError, ValueError) as err:
        p.error(str(err))
    print("\n\n".join(report.text_table(d) for d in docs) if args.text else report.markdown(docs), end="\n")
    if args.plot:
        report.plot(docs, args.plot)
    return 0


def _run(argv: list[str]) -> int:
    p = run_parser()
    args = p.parse_args(argv)
    if args.plot and not args.plot.lower().endswith(".png"):
        p.error(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
    if args.stream_factor <= 0:
        p.error("--stream-factor must be > 0")

    import jax  # noqa: F401  (imported here so `--help` and argument errors are fast)

    from . import device as device_mod
    from . import runner, timing

    try:
        dev = device_mod.pick_device(args.platform)
        clock = timing.make_clock(args.clock, dev)
        kn = args.kn
        if not args.shapes and not kn:
            kn = parse_kn(CPU_DEFAULT_KN) if dev.platform == "cpu" else []
        shapes = resolve_shapes(args.shapes or (["llama3-8b"] if not kn else []), args.tp, kn)
    except ValueError as err:
        p.error(str(err))

    settings = runner.Settings(
        calls=args.calls[0], rounds=args.rounds[0], warmup=args.warmup[0], stream_factor=args.stream_factor,
        check=args.check, time_budget_s=args.time_budget,
        copy_bytes=int(args.copy_mib * 2**20) if args.copy_mib else None,
        l2_bytes=int(args.l2_mib * 2**20) if args.l2_mib is not None else None,
    )
    env = device_mod.environment(dev, argv)
    if settings.l2_bytes is not None:
        env["l2_bytes"], env["l2_source"] = settings.l2_bytes, "--l2-mib"
    configs = runner.configs_for(shapes, args.m, args.bits, args.group_size, args.dtype)

    progress = None
    if args.progress:
        from tqdm.auto import tqdm

        progress = lambda total: tqdm(  # noqa: E731  (disable=None: no bar when stderr is not a terminal)
            total=total, desc="flute_jax.bench", unit="run", file=sys.stderr, disable=None)
    header = {
        "schema": report.SCHEMA,
        "environment": env,
        "settings": {**dataclasses.asdict(settings), "clock": clock.name, "methods": args.methods,
                     "m": args.m, "bits": args.bits, "group_size": args.group_size, "dtype": args.dtype,
                     "shapes": [dataclasses.asdict(s) for s in shapes]},
    }

    def write(out: dict) -> None:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({**header, **out}, f, indent=1)

    out = runner.run(configs, args.methods, dev, clock, settings, progress, on_point=write)
    write(out)
    doc = {**header, **out}
    if args.plot and doc["results"]:
        report.plot([doc], args.plot)
    print(report.markdown([doc]) if args.markdown else report.text_table(doc))
    failed = report.check_failures(doc["results"]) or report.errors(doc["results"])
    return 1 if failed else 0
