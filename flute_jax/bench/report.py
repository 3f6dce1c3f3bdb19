"""Turning a benchmark JSON into a terminal table, Markdown (BENCHMARKS.md) and a plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Iterable, Optional

from .methods import LABELS, METHODS

SCHEMA = "flute_jax.bench/1"


def load(paths: Iterable[str]) -> list[dict]:
    """Benchmark documents from JSON files; ValueError if one is not ours."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a flute_jax benchmark result (schema {SCHEMA})")
        docs.append(doc)
    return docs


def _fmt_us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _methods_in(results: list[dict]) -> list[str]:
    present = {name for r in results for name in r["methods"]}
    return [m for m in METHODS if m in present]


def _label(name: str, dtype: str = "bfloat16") -> str:
    return LABELS[name].format(dtype={"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype))


def _rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    head = ["shape", "M", "K", "N", "bits", "group", "dtype"]
    for n in names:
        short = {"flute": "flute", "xla_dot": "dot", "xla_int4": "int4", "naive_lut": "lut"}[n]
        head += [f"{short} us"] + ([f"{short} x", f"{short} roof"] if n != "xla_dot" else [f"{short} roof"])
    head.append("ceiling")
    rows = []
    for r in results:
        row = [r.get("shape_name") or "", str(r["m"]), str(r["k"]), str(r["n"]), str(r["bits"]),
               str(r["group_size"]), r["dtype"]]
        for n in names:
            rec = r["methods"].get(n)
            if rec is None:
                row += ["-"] * (2 if n == "xla_dot" else 3)
                continue
            if rec.get("time_us") is None:
                row += ["ERROR"] + ["-"] * (1 if n == "xla_dot" else 2)
                continue
            flag = "" if (rec.get("check") or {}).get("ok", True) else " WRONG"
            row.append(_fmt_us(rec["time_us"]) + flag)
            if n != "xla_dot":
                row.append(_fmt_x(rec.get("speedup_vs_dot")))
            row.append(_fmt_pct(rec.get("roofline_fraction")))
        row.append(_fmt_x(r.get("speedup_ceiling")))
        rows.append(row)
    return head, rows


def text_table(doc: dict) -> str:
    """A fixed-width table for the terminal, with the environment line and kernel lists."""
    env, results = doc["environment"], doc["results"]
    names = _methods_in(results)
    head, rows = _rows(results, names)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    bw = doc["bandwidth"]["bytes_per_s"]
    out = [
        f"{env['device']} ({env['platform']}): {env['timing']}",
        f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write); L2 {env['l2_bytes'] / 2**20:.0f} MiB "
        f"[{env['l2_source']}]; jax {env['jax_version']}; {env['date']}",
        "x = speed-up over the XLA dot of the same dtype; roof = roofline time / time "
        "(roofline = bytes of weights + scales + x + y at the copy bandwidth)",
        "",
        line(head),
        line(["-" * w for w in widths]),
        *[line(r) for r in rows],
    ]
    if not doc.get("complete", True):
        out.append("(incomplete: stopped by --time-budget or Ctrl-C)")
    split = time_split(results)
    out.append(f"elapsed {doc.get('elapsed_s', 0):.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in split.items()))
    out += ["", *kernel_lines(results, markdown=False)]
    failed = check_failures(results)
    if failed:
        out += ["", "CHECK FAILED (result differs from the float64 reference):", *failed]
    if errors(results):
        out += ["", "ERRORS:", *errors(results)]
    return "\n".join(out)


def errors(results: list[dict]) -> list[str]:
    """Measurements that raised (the sweep recorded the error and went on)."""
    seen, out = set(), []
    for r in results:
        for name, rec in r["methods"].items():
            line = f"  {name} M={r['m']} K={r['k']} N={r['n']} bits={r['bits']} g={r['group_size']} {r['dtype']}: " \
                   f"{rec.get('error')}"
            if rec.get("error") and line not in seen:
                seen.add(line)
                out.append(line)
    return out


def check_failures(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for name, rec in r["methods"].items():
            chk = rec.get("check")
            if chk and not chk["ok"]:
                out.append(f"  {name} M={r['m']} K={r['k']} N={r['n']} bits={r['bits']} g={r['group_size']} "
                           f"{r['dtype']}: rel error {chk['rel_error']:.3g} > {chk['tolerance']:g}")
    return out


def kernel_lines(results: list[dict], markdown: bool) -> list[str]:
    """Distinct kernel sequences per method (device kernels on GPU, compiled HLO ops always)."""
    seen = defaultdict(list)  # (method, kernels, ops) -> example points
    for r in results:
        for name, rec in r["methods"].items():
            if rec.get("error"):
                continue
            key = (name, tuple(rec.get("kernels") or ()), tuple(rec.get("hlo_ops") or ()))
            seen[key].append(f"M={r['m']} {r['k']}x{r['n']}")
    out = ["Kernels per call" + (" (device trace), and compiled HLO ops:" if markdown else ":")]
    for (name, kernels, ops), where in seen.items():
        example = ", ".join(where[:2]) + (f" +{len(where) - 2} more" if len(where) > 2 else "")
        kern = "; ".join(_short(k) for k in kernels) if kernels else "(no device trace on CPU)"
        if markdown:
            out.append(f"- **{name}** ({example}): kernels `{kern}`; HLO `{' '.join(ops)}`")
        else:
            out.append(f"  {name:9s} [{example}]")
            out.append(f"            kernels: {kern}")
            out.append(f"            HLO ops: {' '.join(ops)}")
    return out


def _short(name: str, limit: int = 90) -> str:
    """Kernel names can be long C++ template names: keep the head and the tail."""
    return name if len(name) <= limit else name[: limit - 25] + "..." + name[-22:]


def time_split(results: list[dict]) -> dict:
    """Seconds spent per phase over all distinct measurements (to budget GPU time)."""
    total, seen = {}, set()
    for r in results:
        for rec in r["methods"].values():
            sec = rec.get("seconds")
            key = (rec.get("method"), json.dumps(sec, sort_keys=True))  # reused measurements count once
            if sec and key not in seen:
                seen.add(key)
                for k, v in sec.items():
                    total[k] = total.get(k, 0.0) + v
    return total


def geomean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(results: list[dict]) -> dict:
    """{(dtype, group, bits, M): {method: geometric-mean speed-up over the dot, ..., "shapes": n}}."""
    acc = defaultdict(lambda: defaultdict(list))
    count = defaultdict(int)
    for r in results:
        key = (r["dtype"], r["group_size"], r["bits"], r["m"])
        count[key] += 1
        for name, rec in r["methods"].items():
            if name != "xla_dot" and rec.get("speedup_vs_dot"):
                acc[key][name].append(rec["speedup_vs_dot"])
            if name == "flute" and rec.get("roofline_fraction"):
                acc[key]["flute_roof"].append(rec["roofline_fraction"])
        if r.get("speedup_ceiling"):
            acc[key]["ceiling"].append(r["speedup_ceiling"])
    return {k: {**{n: geomean(v) for n, v in acc[k].items()}, "shapes": count[k]} for k in sorted(count)}


def _point_key(r: dict) -> tuple:
    return (r.get("shape_name") or "", r["m"], r["k"], r["n"], r["bits"], r["group_size"], r["dtype"])


def compare(docs: list[dict], labels: list[str], method: str = "flute") -> str:
    """Runs side by side (an A/B of two builds, a device against another): for each point of
    the first run, the method's time in each run with its speed-up over that run's own dot,
    and the first run's time over this one's ("gain", > 1 when faster); then the geometric
    means per (dtype, group, bits, M). Points missing from a run show "-"."""
    by_run = [{_point_key(r): r for r in doc["results"]} for doc in docs]

    def cell(r: Optional[dict]) -> tuple[Optional[float], Optional[float]]:
        rec = (r or {}).get("methods", {}).get(method) or {}
        return rec.get("time_us"), rec.get("speedup_vs_dot")

    head = ["shape", "M", "bits", "group", "dtype"]
    for i, label in enumerate(labels):
        head += [f"{label} us", f"{label} x"] + ([f"{label} gain"] if i else [])
    rows, speedups, gains = [], defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for key in by_run[0]:
        name, m, _, _, bits, group, dtype = key
        row = [name, str(m), str(bits), str(group), dtype]
        t0 = cell(by_run[0][key])[0]
        for i, run in enumerate(by_run):
            t, x = cell(run.get(key))
            row += [_fmt_us(t), _fmt_x(x)]
            if x:
                speedups[(dtype, group, bits, m)][i].append(x)
            if i:
                gain = t0 / t if t0 and t else None
                row.append(_fmt_x(gain))
                if gain:
                    gains[(dtype, group, bits, m)][i].append(gain)
        rows.append(row)
    # (Keys of the gains too: runs of the method alone, without the dot, have gains but no speed-ups.)
    for k in sorted(set(speedups) | set(gains)):
        row = ["geomean", str(k[3]), str(k[2]), str(k[1]), k[0]]
        for i in range(len(docs)):
            row += ["", _fmt_x(geomean(speedups[k][i]))] + ([_fmt_x(geomean(gains[k][i]))] if i else [])
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    envs = [f"{label}: {doc['environment']['device']}, {doc['environment']['date']}" for label, doc in zip(labels, docs)]
    return "\n".join([f"{method}: time in us, x = speed-up over the dot of the same run, "
                      f"gain = {labels[0]} time / time", *envs, "", line(head), line(["-" * w for w in widths]),
                      *[line(r) for r in rows]])


def merged_results(docs: list[dict]) -> list[dict]:
    """Points of several runs; a point measured in more than one run is kept from the first."""
    seen, out = set(), []
    for doc in docs:
        for r in doc["results"]:
            key = (r["m"], r["k"], r["n"], r["bits"], r["group_size"], r["dtype"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def markdown(docs: list[dict]) -> str:
    """BENCHMARKS.md: environment, headline summary, full table, kernels."""
    out = ["# flute_jax benchmarks", ""]
    for doc in docs:
        env = doc["environment"]
        out += [
            f"- **{env['device']}** ({env['platform']}), driver {env.get('driver_version') or 'n/a'}, "
            f"JAX {env['jax_version']} / jaxlib {env['jaxlib_version']}, flute_jax {env['flute_jax_version']}, "
            f"{env['date']}",
            f"  - timing: {env['timing']}; copy bandwidth {doc['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s; "
            f"L2 {env['l2_bytes'] / 2**20:.0f} MiB ({env['l2_source']})",
            f"  - command: `{env['command']}`" + ("" if doc.get("complete", True) else " (incomplete)"),
        ]
    results = merged_results(docs)
    names = _methods_in(results)
    out += ["", "Speed-up = time of XLA's dot in the same dtype / time. Roofline = (packed weights + scales + x + y) "
            "bytes at the measured copy bandwidth; \"roof\" = roofline time / time. Ceiling = the speed-up over the "
            "dot that the bytes allow.", "", "## Summary (geometric mean over shapes)", ""]
    others = [n for n in names if n != "xla_dot"]
    head = ["dtype", "group", "bits", "M", "shapes"] + [f"{_label(n)} speed-up" for n in others]
    if "flute" in names:
        head += ["flute roofline fraction", "ceiling"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, group, bits, m), d in summary(results).items():
        cells = [dtype, str(group), str(bits), str(m), str(d["shapes"])] + [_fmt_x(d.get(n)) for n in others]
        if "flute" in names:
            cells += [_fmt_pct(d.get("flute_roof")), _fmt_x(d.get("ceiling"))]
        out.append("| " + " | ".join(cells) + " |")
    head, rows = _rows(results, names)
    out += ["", "## All points (times in us)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", *kernel_lines(results, markdown=True)]
    failed = check_failures(results)
    if failed:
        out += ["", "**Check failed** (differs from the float64 reference):", "", *failed]
    if errors(results):
        out += ["", "**Errors:**", "", *errors(results)]
    return "\n".join(out) + "\n"


def plot(docs: list[dict], path: str) -> None:
    """PNG: geometric-mean speed-up over the dot against M, one line per bits (one panel per dtype/group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = merged_results(docs)
    if not results:
        raise ValueError("no results to plot")
    summ = summary(results)
    panels = sorted({(k[0], k[1]) for k in summ})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colors = {2: "tab:red", 3: "tab:orange", 4: "tab:blue"}
    for ax, (dtype, group) in zip(axes[0], panels):
        bits_list = sorted({k[2] for k in summ if k[:2] == (dtype, group)})
        for bits in bits_list:
            pts = sorted((k[3], d) for k, d in summ.items() if k[:3] == (dtype, group, bits))
            ms = [m for m, _ in pts]
            if any(d.get("flute") for _, d in pts):
                ax.plot(ms, [d.get("flute") or float("nan") for _, d in pts], "o-", color=colors.get(bits),
                        label=f"flute_jax {bits}-bit")
                ax.plot(ms, [d.get("ceiling") or float("nan") for _, d in pts], ":", color=colors.get(bits),
                        label=f"{bits}-bit bandwidth ceiling")
        # The int4/LUT baselines do not depend on bits: draw them once.
        pts = sorted((k[3], d) for k, d in summ.items() if k[:2] == (dtype, group) and k[2] == bits_list[-1])
        for name, style in (("xla_int4", "s--"), ("naive_lut", "^--")):
            if any(d.get(name) for _, d in pts):
                ax.plot([m for m, _ in pts], [d.get(name) or float("nan") for _, d in pts], style, color="gray",
                        label=_label(name, dtype))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"speed-up over XLA {_label('xla_dot', dtype).split()[1]} dot")
        ax.set_title(f"{dtype}, group {group}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = docs[0]["environment"]
    fig.suptitle(f"flute_jax on {env['device']} ({'device time' if env['platform'] == 'gpu' else 'CPU wall clock'})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
