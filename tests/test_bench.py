"""The benchmark CLI: a tiny CPU sweep end to end, trace parsing, shapes, arguments."""

import contextlib
import gzip
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flute_jax import layout
from flute_jax.bench import cli, hlo, methods, report, runner, shapes, timing, trace
from flute_jax.quantize import num_groups

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- end to end on CPU
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One tiny CPU sweep shared by the end-to-end tests (odd K: padded layout, partial group)."""
    d = tmp_path_factory.mktemp("bench")
    out, png = d / "r.json", d / "r.png"
    argv = ["--platform", "cpu", "--kn", "300x160", "--m", "1,3", "--bits", "2,4", "--group-size", "64",
            "--calls", "3", "--rounds", "2", "--warmup", "1", "--copy-mib", "1", "--no-progress",
            "--json", str(out), "--plot", str(png)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(argv)
    return rc, json.loads(out.read_text()), png, out, printed.getvalue()


def test_sweep_json_is_complete_and_consistent(sweep):
    rc, doc, _, _, printed = sweep
    assert rc == 0
    env = doc["environment"]
    assert doc["schema"] == report.SCHEMA and doc["complete"]
    assert env["platform"] == "cpu" and "wall-clock" in env["timing"]
    assert env["jax_version"] == jax.__version__ and env["date"] and env["device"]
    assert env["command"].startswith("python -m flute_jax.bench --platform cpu")
    assert doc["bandwidth"]["bytes_per_s"] > 0
    bw = doc["bandwidth"]["bytes_per_s"]
    points = {(r["m"], r["bits"]): r for r in doc["results"]}
    assert set(points) == {(1, 2), (1, 4), (3, 2), (3, 4)}
    for (m, bits), r in points.items():
        assert (r["k"], r["n"], r["group_size"], r["dtype"]) == (300, 160, 64, "bfloat16")
        assert set(r["methods"]) == set(methods.METHODS)
        dot = r["methods"]["xla_dot"]
        for name, rec in r["methods"].items():
            assert rec["time_us"] > 0 and rec["n_calls"] == 6 and len(rec["round_medians_us"]) == 2
            assert rec["grouping"] == "per-call"
            assert rec["check"]["ok"], (name, rec["check"])
            assert rec["speedup_vs_dot"] == pytest.approx(dot["time_us"] / rec["time_us"])
            assert rec["roofline_us"] == pytest.approx(rec["roofline_bytes"] / bw * 1e6)
            assert rec["roofline_fraction"] == pytest.approx(rec["roofline_us"] / rec["time_us"])
        # Roofline bytes recomputed from the formats: packed codes + scales + table + x + y.
        g = num_groups(300, 64)
        xy = 2 * (m * 300 + m * 160)
        kb, nb, words = layout.packed_shape(300, 160, bits)
        assert r["methods"]["flute"]["roofline_bytes"] == 4 * kb * nb * words + 2 * g * 160 + 2 * 2**bits + xy
        assert dot["roofline_bytes"] == 2 * 300 * 160 + xy
        assert r["methods"]["xla_int4"]["roofline_bytes"] == 300 * 160 // 2 + 2 * g * 160 + xy
        assert r["methods"]["naive_lut"]["roofline_bytes"] == 300 * 160 // 2 + 2 * g * 160 + 2 * 16 + xy
        assert r["speedup_ceiling"] == pytest.approx(
            (2 * 300 * 160 + xy) / r["methods"]["flute"]["roofline_bytes"])
        # What ran: one custom call for flute, one matmul for every XLA method.
        assert r["methods"]["flute"]["hlo_ops"] == ["custom-call(flute_qgemm)"]
    # The baselines do not depend on bits: measured once, reused.
    for name in ("xla_dot", "xla_int4", "naive_lut"):
        for m in (1, 3):
            assert points[(m, 2)]["methods"][name]["time_us"] == points[(m, 4)]["methods"][name]["time_us"]
    assert "CPU wall-clock" in printed and "flute us" in printed


def test_sweep_plot_and_report(sweep, tmp_path, capsys):
    _, doc, png, path, _ = sweep
    assert png.read_bytes()[:8] == PNG_MAGIC
    png2 = tmp_path / "again.png"
    assert cli.main(["report", str(path), "--plot", str(png2)]) == 0
    md = capsys.readouterr().out
    assert png2.read_bytes()[:8] == PNG_MAGIC
    assert md.startswith("# flute_jax benchmarks")
    assert "## Summary" in md and "## All points" in md and "custom-call(flute_qgemm)" in md
    table_rows = [l for l in md.splitlines() if l.startswith("| 300x160 |")]
    assert len(table_rows) == 4
    assert cli.main(["report", str(path), "--text"]) == 0
    assert "300x160" in capsys.readouterr().out


def test_summary_is_geometric_mean():
    def point(m, s):
        return {"dtype": "bfloat16", "group_size": 128, "bits": 4, "m": m, "speedup_ceiling": 3.0,
                "methods": {"flute": {"speedup_vs_dot": s, "roofline_fraction": 0.5}, "xla_dot": {}}}

    summ = report.summary([point(1, 2.0), point(1, 8.0), point(16, 1.0)])
    assert summ[("bfloat16", 128, 4, 1)]["flute"] == pytest.approx(4.0)
    assert summ[("bfloat16", 128, 4, 1)]["shapes"] == 2
    assert summ[("bfloat16", 128, 4, 16)]["flute"] == pytest.approx(1.0)


# ---------------------------------------------------------------- trace parsing (GPU format)
def _gpu_trace(kernels_per_call, n_calls, durs, extra_kernel_at=None):
    """A trace in the JAX perfetto format: GPU:0 with a stream line and a derived line, GPU:1, host."""
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 101, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    ts = 100.0
    for c in range(n_calls):
        for j, name in enumerate(kernels_per_call):
            d = durs[c][j]
            ev.append({"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": d, "name": name, "args": {"hlo_op": "x"}})
            ev.append({"ph": "X", "pid": 1, "tid": 101, "ts": ts, "dur": d, "name": "fusion"})  # derived
            ev.append({"ph": "X", "pid": 2, "tid": 7, "ts": ts, "dur": 99.0, "name": name})  # other GPU
            ev.append({"ph": "X", "pid": 701, "tid": 3, "ts": ts, "dur": 50.0, "name": "PjitFunction"})
            ts += d + 1.0
        if c == extra_kernel_at:
            ev.append({"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": 1.0, "name": "surprise"})
            ts += 2.0
        ts += 20.0
    return ev


def test_split_calls_sums_stream_kernels_per_call(rng):
    durs = rng.uniform(1.0, 30.0, (5, 2))
    ev = _gpu_trace(["dequant_fusion", "gemm_kernel"], 5, durs)
    rng.shuffle(ev)  # the file's event order is not time order
    dev = trace.device_events(ev, "/device:GPU:0")
    assert dev.lines == ["Stream #7(Compute)"]
    t = trace.split_calls(dev.events, 5)
    assert t.grouping == "per-call"
    np.testing.assert_allclose(t.per_call_us, durs.sum(axis=1))
    assert t.kernels == ["dequant_fusion", "gemm_kernel"]
    assert t.mean_us == pytest.approx(durs.sum() / 5)


def test_split_calls_counts_overlapping_kernels_once(rng):
    # a programmatic dependent launch starts before the kernel ahead of it ends: a call's
    # device time is the time the device was busy with it, not the sum of the durations
    events, busy = [], []
    for c in range(3):
        t0 = 1000.0 * c + rng.uniform(0, 5)
        zero, main = rng.uniform(1, 2), rng.uniform(5, 9)
        start = t0 + rng.uniform(0.2, 0.8) * zero  # starts while the small kernel runs
        events += [{"ph": "X", "pid": 1, "tid": 7, "ts": t0, "dur": zero, "name": "ZeroCounters"},
                   {"ph": "X", "pid": 1, "tid": 7, "ts": start, "dur": main, "name": "FluteQgemm"},
                   {"ph": "X", "pid": 1, "tid": 7, "ts": t0 + 50, "dur": 2.0, "name": "later"}]
        busy.append(start + main - t0 + 2.0)
    rng.shuffle(events)
    t = trace.split_calls(sorted(events, key=lambda e: e["ts"]), 3)
    assert t.grouping == "per-call"
    np.testing.assert_allclose(t.per_call_us, busy)
    assert t.mean_us == pytest.approx(sum(busy) / 3)
    # nested, overlapping and disjoint intervals, in any order
    assert trace.busy_us([{"ts": 12.0, "dur": 1.0}, {"ts": 0.0, "dur": 10.0}, {"ts": 2.0, "dur": 3.0},
                          {"ts": 9.0, "dur": 2.0}]) == 12.0
    assert trace.busy_us([]) == 0.0


def test_split_calls_counts_overlap_between_calls_once(rng):
    # each call's kernel starts (as a programmatic dependent) before the previous call's
    # kernel ends: the overlap belongs to the earlier call, and the calls add up to the union
    events, t0, busy = [], 0.0, []
    for c in range(4):
        dur = rng.uniform(5, 9)
        start = t0 - (rng.uniform(0.5, 1.5) if c else 0.0)
        events.append({"ph": "X", "pid": 1, "tid": 7, "ts": start, "dur": dur, "name": "FluteQgemm"})
        busy.append(start + dur - t0)
        t0 = start + dur
    t = trace.split_calls(events, 4)
    np.testing.assert_allclose(t.per_call_us, busy)
    assert sum(t.per_call_us) == pytest.approx(trace.busy_us(events))


def test_split_calls_refuses_inconsistent_calls(rng):
    durs = rng.uniform(1.0, 30.0, (4, 1))
    ev = _gpu_trace(["k"], 4, durs, extra_kernel_at=1)
    t = trace.split_calls(trace.device_events(ev).events, 4)
    assert t.per_call_us is None and "not a multiple" in t.grouping
    assert t.mean_us == pytest.approx((durs.sum() + 1.0) / 4)
    ev = _gpu_trace(["a", "b"], 2, rng.uniform(1, 2, (2, 2)))
    for e in ev:  # call 1 launches another kernel than call 0
        if e.get("name") == "b" and e.get("ts", 0) > 110 and e.get("pid") == 1 and e.get("tid") == 7:
            e["name"] = "c"
    t = trace.split_calls(trace.device_events(ev).events, 2)
    assert t.per_call_us is None and "other kernels" in t.grouping
    with pytest.raises(ValueError, match="no device events"):
        trace.split_calls([], 3)


def test_device_events_without_stream_names_drops_derived_lines():
    ev = _gpu_trace(["k"], 3, [[2.0], [3.0], [4.0]])
    for e in ev:
        if e.get("name") == "thread_name" and e["args"]["name"].startswith("Stream"):
            e["args"]["name"] = "Compute"
    dev = trace.device_events(ev)
    assert dev.lines == ["Compute"]
    assert trace.split_calls(dev.events, 3).per_call_us == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="no process '/device:GPU:3'.*GPU:0"):
        trace.device_events(ev, "/device:GPU:3")


def test_real_profiler_trace_on_cpu(tmp_path):
    """The installed JAX writes a perfetto trace we can find, read and select a process from."""
    f = jax.jit(lambda a: jnp.sin(a) @ a)
    a = jnp.ones((64, 64), jnp.float32)
    f(a).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(a).block_until_ready()
    path = trace.find_trace_file(str(tmp_path))
    with gzip.open(path, "rt") as fh:
        assert "traceEvents" in json.load(fh)
    events = trace.load_events(path)
    assert trace.device_events(events, "/host:CPU").events
    with pytest.raises(ValueError, match="/device:GPU:0"):
        trace.device_events(events, "/device:GPU:0")
    with pytest.raises(FileNotFoundError):
        trace.find_trace_file(str(tmp_path / "empty"))


def test_profiler_clock_runs_on_installed_jax():
    """The GPU clock's trace/parse path, pointed at the CPU process (calls cannot be split there)."""
    clock = timing.ProfilerClock("/host:CPU")
    f = jax.jit(lambda a: a * 2.0)
    sets = [(jnp.ones(256) * i,) for i in range(3)]
    f(*sets[0]).block_until_ready()
    t = clock.time(f, sets, 4)
    assert t.mean_us > 0 and clock.last_lines


# ---------------------------------------------------------------- pieces
def test_llama3_shapes_and_tp_splits():
    s1 = shapes.llama3_shapes("llama3-8b", 1)
    assert [(s.k, s.n) for s in s1] == [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
    s4 = shapes.llama3_shapes("llama3-70b", 4)  # column-parallel split N, row-parallel split K
    assert [(s.k, s.n) for s in s4] == [(8192, 2560), (2048, 8192), (8192, 14336), (7168, 8192)]
    assert s4[2].label == "llama3-70b gate_up tp4"
    assert len(shapes.resolve_shapes(["llama3-8b", "llama3-70b"], [1], shapes.parse_kn("4096x4096"))) == 8
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        shapes.llama3_shapes("llama3-8b", 3)
    with pytest.raises(ValueError, match="KxN"):
        shapes.parse_kn("4096x")


def test_sets_needed_defeats_l2():
    s = runner.Settings()
    h100 = 50 * 2**20
    n = runner.sets_needed(32 * 2**20, h100, s)  # a 4-bit 8192x8192 weight fits in L2
    assert (n - 1) * 32 * 2**20 >= 8 * h100 and (n - 2) * 32 * 2**20 < 8 * h100
    assert runner.sets_needed(4 * 2**30, h100, s) == s.min_sets
    assert runner.sets_needed(10**6, 0, s) == s.min_sets


def test_methods_compute_their_definitions(rng):
    """Each method's fn equals float64 x @ W(reference) on a small odd shape (group tail, padding)."""
    c = methods.Config(m=3, k=200, n=40, bits=3, group_size=64, dtype="float16")
    for name in methods.METHODS:
        method = methods.REGISTRY[name]
        args = method.make(jax.random.key(int(rng.integers(1 << 30))), c)
        w = np.asarray(method.reference(c, c.n)(*args[1:]), np.float64)
        x = np.asarray(args[0].astype(jnp.float32), np.float64)
        y = np.asarray(jax.jit(method.fn(c))(*args).astype(jnp.float32), np.float64)
        assert y.shape == (3, 40) and np.linalg.norm(w) > 0
        assert np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w) < 2e-3, name


def test_expand_scales_groups():
    s = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
    e = np.asarray(methods.expand_scales(s, 5, 2))
    np.testing.assert_array_equal(e[:, 0], [0, 0, 2, 2, 4])
    np.testing.assert_array_equal(np.asarray(methods.expand_scales(s[:1], 4, -1))[:, 1], [1, 1, 1, 1])


def test_entry_ops_reads_compiled_hlo():
    text = """HloModule m

%fused (p: s4[8,4]) -> bf16[8,4] {
  %p = s4[8,4]{1,0} parameter(0)
  ROOT %c = bf16[8,4]{1,0} convert(%p)
}

ENTRY %main (x: bf16[2,8], w: s4[8,4]) -> (bf16[2,4], bf16[8,4]) {
  %x = bf16[2,8]{1,0} parameter(0)
  %w = s4[8,4]{1,0:E(4)} parameter(1)
  %fusion = bf16[8,4]{1,0} fusion(%w), kind=kLoop, calls=%fused
  %gemm = (bf16[2,4]{1,0}, s8[0]{0}) custom-call(%x, %fusion), custom_call_target="__cublas$gemm"
  %gte = bf16[2,4]{1,0} get-tuple-element(%gemm), index=0
  ROOT %t = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) tuple(%gte, %fusion)
}
"""
    assert hlo.entry_ops(text) == ["fusion(kLoop)", "custom-call(__cublas$gemm)"]


def test_copy_bandwidth_wall_clock():
    out = timing.copy_bandwidth(timing.WallClock(), 2**20, calls=3, warmup=1)
    assert out["bytes_moved_per_call"] == 2 * 2**20
    assert out["bytes_per_s"] == max(v["bytes_per_s"] for v in out["variants"].values())
    assert math.isfinite(out["bytes_per_s"]) and out["bytes_per_s"] > 0


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits must be among [2, 3, 4]"),
        (["--bits", "four"], "--bits must be comma-separated integers"),
        (["--kn", "4096x"], "KxN pairs"),
        (["--shapes", "llama3-7b"], "--shapes must be among llama3-8b"),
        (["--tp", "3"], "--tp must be among [1, 2, 4, 8]"),
        (["--group-size", "100"], "--group-size must be among"),
        (["--dtype", "float64"], "--dtype must be among bfloat16, float16"),
        (["--methods", "flute,cublas"], "--methods must be among flute"),
        (["--m", "0"], "--m must be >= 1"),
        (["--plot", "out.jpg"], "ending in .png"),
        (["--platform", "tpu"], "invalid choice"),
        (["--clock", "profiler", "--platform", "cpu"], "needs a GPU"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_report_rejects_foreign_json(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit) as err:
        cli.main(["report", str(p)])
    assert err.value.code == 2 and "not a flute_jax benchmark result" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "missing.json")])


def test_failed_measurement_is_recorded_and_sweep_goes_on(monkeypatch, tmp_path, capsys):
    """One method raising must not lose the others; the report and exit code show it."""
    real = methods.REGISTRY["naive_lut"]

    def broken(c):
        def fn(*args):
            raise RuntimeError("simulated kernel failure")

        return fn

    monkeypatch.setitem(methods.REGISTRY, "naive_lut", methods.Method("naive_lut", real.make, broken,
                                                                      real.reference, real.cache_fields))
    out = tmp_path / "r.json"
    rc = cli.main(["--platform", "cpu", "--kn", "256x64", "--m", "2", "--methods", "xla_dot,naive_lut",
                   "--calls", "2", "--rounds", "1", "--warmup", "1", "--copy-mib", "1", "--no-progress",
                   "--json", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    (point,) = doc["results"]
    assert point["methods"]["xla_dot"]["time_us"] > 0
    assert point["methods"]["naive_lut"]["time_us"] is None
    assert "simulated kernel failure" in point["methods"]["naive_lut"]["error"]
    printed = capsys.readouterr().out
    assert "ERRORS:" in printed and "ERROR" in printed
    assert "simulated kernel failure" in report.markdown([doc])


# ---------------------------------------------------------------- compare
def _doc(points, device="GPU A"):
    """A minimal benchmark document: points = {(shape, m): (flute us, dot us)}; a dot time of
    None: flute measured alone (``--methods flute``)."""
    results = []
    for (name, m), (t_flute, t_dot) in points.items():
        methods = {"flute": {"time_us": t_flute, "speedup_vs_dot": t_dot / t_flute if t_dot else None}}
        if t_dot:
            methods["xla_dot"] = {"time_us": t_dot}
        results.append({"shape_name": name, "m": m, "k": 4096, "n": 4096, "bits": 4, "group_size": 128,
                        "dtype": "bfloat16", "methods": methods})
    return {"schema": report.SCHEMA, "environment": {"device": device, "date": "2026-11-30"}, "results": results}


def _table_rows(text):
    """{(first cell, M): cells} of compare's table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("---")) + 1
    return {(c[0], c[1]): c for c in (line.split() for line in lines[start:])}


def test_compare_gains_and_geomeans(tmp_path, capsys):
    base = _doc({("a", 1): (10.0, 20.0), ("b", 1): (40.0, 80.0), ("a", 16): (20.0, 20.0)})
    new = _doc({("a", 1): (8.0, 20.0), ("b", 1): (10.0, 80.0)}, device="GPU B")  # ("a", 16) missing
    paths = []
    for i, doc in enumerate((base, new)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert cli.main(["compare", str(paths[0]), str(paths[1]), "--labels", "old,new"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert "old: GPU A" in out and "new: GPU B" in out
    # a, M=1: 10 -> 8 us (2.00x -> 2.50x over the dot), gain 1.25x
    assert rows[("a", "1")][5:] == ["10.0", "2.00x", "8.00", "2.50x", "1.25x"]
    assert rows[("a", "16")][5:] == ["20.0", "1.00x", "-", "-", "-"]
    # geomean at M=1: old sqrt(2 * 2) = 2, new sqrt(2.5 * 8) = 4.47, gain sqrt(1.25 * 4) = 2.24
    assert rows[("geomean", "1")][5:] == ["2.00x", "4.47x", "2.24x"]
    assert rows[("geomean", "16")][5:] == ["1.00x", "-", "-"]


def test_compare_geomeans_of_runs_without_the_dot(tmp_path, capsys):
    # --methods flute alone: no speed-ups, but the gains still get their geometric mean
    base = _doc({("a", 1): (10.0, None), ("b", 1): (40.0, None)})
    new = _doc({("a", 1): (8.0, None), ("b", 1): (10.0, None)})
    paths = []
    for i, doc in enumerate((base, new)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert cli.main(["compare", str(paths[0]), str(paths[1]), "--labels", "old,new"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows[("a", "1")][5:] == ["10.0", "-", "8.00", "-", "1.25x"]
    assert rows[("geomean", "1")][5:] == ["-", "-", "2.24x"]  # sqrt(1.25 * 4)


def test_compare_arguments(tmp_path, capsys):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(_doc({("a", 1): (10.0, 20.0)})))
    with pytest.raises(SystemExit) as err:
        cli.main(["compare", str(p), str(p), "--labels", "just-one"])
    assert err.value.code == 2 and "names 1 runs for 2 files" in capsys.readouterr().err
    q = tmp_path / "x.json"
    q.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit) as err:
        cli.main(["compare", str(p), str(q)])
    assert err.value.code == 2 and "not a flute_jax benchmark result" in capsys.readouterr().err
    assert cli.main(["compare", str(p)]) == 0  # one run: its own table, no gain column
    assert "gain" not in capsys.readouterr().out.splitlines()[3]
