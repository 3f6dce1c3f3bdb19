"""The tuning cache (flute_jax.tuning), its use by the GPU path choice, and the tuner.

The cache and the choice are checked on CPU: the CUDA lowering is inspected without a GPU
(JAX lowers for a platform it does not have). The last test runs the tuner itself and
needs a GPU.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import TOLERANCE, gpu_available, reference_qgemm, rel_error
from flute_jax import _ffi, dispatch, tune, tuning
from qgemm_checks import random_weight

H200 = "NVIDIA H200"


def entry(m, path, *, kind=H200, bits=4, group=128, dtype="bfloat16", k=4096, n=4096, times=None):
    return tuning.Entry(kind, bits, group, dtype, k, n, m, path, times or {path: 1.0})


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    """A cache path of this test's own, in use for the test's duration."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(path))
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH", raising=False)
    return path


def test_write_read_round_trip_and_merge(tmp_path):
    path = str(tmp_path / "sub" / "t.json")  # the folder is created
    first = [entry(256, "dense"), entry(64, "wgmma", times={"wgmma": 10.5, "dense": 12.0, "mma": 30.0})]
    tuning.write(path, first)
    back = tuning.read(path)
    assert [e.m for e in back] == [64, 256]  # sorted
    assert back[0].times_us == {"wgmma": 10.5, "dense": 12.0, "mma": 30.0} and back[1].path == "dense"
    with open(path) as f:
        assert json.load(f)["version"] == tuning.VERSION
    merged = tuning.merge(back, [entry(256, "wgmma"), entry(256, "mma", dtype="float16")])
    tuning.write(path, merged)
    by_key = {(e.dtype, e.m): e.path for e in tuning.read(path)}
    assert by_key == {("bfloat16", 64): "wgmma", ("bfloat16", 256): "wgmma", ("float16", 256): "mma"}
    assert not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tuning-")]  # no temporary left


def test_nearest_measured_m_within_a_factor_of_two():
    es = [entry(64, "wgmma"), entry(256, "dense")]
    problem = es[0].problem
    pick = lambda m: (e.m if (e := tuning.nearest(es, problem, m)) else None)  # noqa: E731
    assert pick(64) == 64 and pick(100) == 64 and pick(200) == 256 and pick(512) == 256
    assert pick(128) == 64  # a tie on the log scale goes to the smaller M
    assert pick(32) == 64 and pick(31) is None and pick(513) is None
    assert tuning.nearest(es, (H200, 4, 128, "float16", 4096, 4096), 64) is None  # another dtype


def test_gpu_path_follows_the_cache(cache_file, monkeypatch):
    tuning.write(str(cache_file), [entry(256, "dense"), entry(32, "mma", bits=3), entry(1024, "wgmma")])
    call = dict(wgmma=True, device_kind=H200, group_size=128, dtype="bfloat16")
    assert dispatch.rule_path(256, 4096, 4096, 4, wgmma=True, device_kind=H200) == "wgmma"
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "dense"
    assert dispatch.gpu_path(300, 4096, 4096, 4, **call) == "dense"  # nearest measured M
    assert dispatch.gpu_path(32, 4096, 4096, 3, **call) == "mma"
    assert dispatch.gpu_path(1024, 4096, 4096, 4, **call) == "wgmma"
    # any field that differs leaves the rule in charge
    assert dispatch.gpu_path(256, 4096, 8192, 4, **call) == "wgmma"
    assert dispatch.gpu_path(256, 4096, 4096, 4, **{**call, "dtype": "float16"}) == "wgmma"
    assert dispatch.gpu_path(256, 4096, 4096, 4, **{**call, "group_size": 64}) == "wgmma"
    assert dispatch.gpu_path(256, 4096, 4096, 4, **{**call, "device_kind": "NVIDIA H100 80GB HBM3"}) == "wgmma"
    assert dispatch.gpu_path(200, 4096, 4096, 4, **{**call, "device_kind": ""}) == "wgmma"  # no GPU kind: rule
    assert dispatch.gpu_path(256, 4096, 4096, 4, wgmma=True, device_kind=H200) == "wgmma"  # no group/dtype: rule
    # a tuned wgmma on a GPU without the tile kernel is not taken
    assert dispatch.gpu_path(1024, 4096, 4096, 4, **{**call, "wgmma": False}) == "dense"
    # the environment variable and force_path come first, force_path before the variable
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "mma")
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "mma"
    with dispatch.force_path("wgmma"):
        assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "wgmma"
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "mma"
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH")
    with pytest.raises(ValueError, match="path must be one of"):
        with dispatch.force_path("fastest"):
            pass
    # "none" turns the cache off
    monkeypatch.setenv(tuning.ENV, "none")
    assert tuning.default_location() is None
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "wgmma"


def test_a_rewritten_cache_is_seen_without_a_restart(cache_file):
    call = dict(wgmma=True, device_kind=H200, group_size=128, dtype="bfloat16")
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "wgmma"  # no file yet
    tuning.write(str(cache_file), [entry(256, "dense")])
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "dense"
    tuning.write(str(cache_file), [entry(256, "mma", times={"mma": 2.0, "dense": 3.0})])
    assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "mma"


@pytest.mark.parametrize(
    "content,reason",
    [
        ('{"version": 2, "entries": []}', "version-1"),
        ("{not json", "Expecting"),
        ('{"version": 1, "entries": [{"device_kind": "NVIDIA H200", "path": "fast"}]}', "bad entry"),
        ('{"version": 1, "entries": {}}', "not a list"),
        (json.dumps({"version": 1, "entries": [{**vars(entry(256, "dense")), "path": "cublas"}]}, default=str),
         "cublas"),
    ],
)
def test_a_bad_cache_file_is_ignored_with_one_warning(cache_file, content, reason):
    cache_file.write_text(content)
    call = dict(wgmma=True, device_kind=H200, group_size=128, dtype="bfloat16")
    with pytest.warns(RuntimeWarning, match=reason):
        assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "wgmma"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again for the same file
        assert dispatch.gpu_path(256, 4096, 4096, 4, **call) == "wgmma"
    with pytest.raises(ValueError):
        tuning.read(str(cache_file))


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.default_location() == str(tmp_path / "flute_jax" / "tuning-v1.json")
    monkeypatch.setenv(tuning.ENV, "~/t.json")
    assert tuning.default_location() == os.path.expanduser("~/t.json")


@pytest.mark.skipif(not _ffi.with_cuda, reason="CPU-only build: no CUDA lowering")
@pytest.mark.parametrize("tuned", ["dense", "mma", "wgmma"])
def test_cuda_lowering_takes_the_tuned_path(rng, cache_file, monkeypatch, tuned):
    monkeypatch.setattr(dispatch, "gpu_device_kind", lambda: H200)
    monkeypatch.setattr(_ffi, "cuda_has_wgmma", lambda: True)
    tuning.write(str(cache_file), [entry(200, tuned, k=512, n=64)])
    jax.clear_caches()  # the path is chosen at lowering time; an earlier lowering may be cached
    qw = random_weight(rng, 512, 64, 4, 128, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((200, 512), jnp.bfloat16)
    text = jax.jit(fj.qgemm).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    assert ("flute_dequantize" in text) == (tuned == "dense")
    if tuned != "dense":
        assert f"kernel = {int(tuned == 'wgmma')} : i64" in text


def test_tuner_chooses_the_fastest_with_a_margin_for_the_rule():
    assert tune.choose({"mma": 10.0, "wgmma": 9.0, "dense": 20.0}, "mma", 0.03) == "wgmma"
    assert tune.choose({"mma": 10.0, "wgmma": 9.8, "dense": 20.0}, "mma", 0.03) == "mma"  # within the margin
    assert tune.choose({"mma": None, "wgmma": 9.8, "dense": 9.0}, "mma", 0.03) == "dense"  # failed: never
    assert tune.choose({"wgmma": None, "dense": None}, "wgmma", 0.03) is None
    assert tune.choose({"wgmma": 5.0, "dense": 5.0}, "dense", 0.0) == "dense"  # a tie: the rule's
    assert tune.candidate_paths(16, True) == ["mma", "wgmma", "dense"]
    assert tune.candidate_paths(16, False) == ["mma", "dense"]
    assert tune.candidate_paths(tune.MMA_MAX_M + 1, True) == ["wgmma", "dense"]


def test_tuner_times_each_candidate_and_records_entries():
    timed = []
    fake_times = {"mma": 50.0, "wgmma": 30.0, "dense": 40.0}

    def measure(pr, path):
        timed.append((pr.m, path))
        return None if (pr.m, path) == (4096, "wgmma") else fake_times[path] * pr.m

    problems = [tune.Problem(m, 8192, 1024, 3, -1, "float16", "x") for m in (64, 4096)]
    seen = []
    out = tune.tune(problems, measure, device_kind=H200, wgmma=True, versions={"jax": "9.9"}, on_entry=seen.append)
    assert timed == [(64, "mma"), (64, "wgmma"), (64, "dense"), (4096, "wgmma"), (4096, "dense")]
    assert seen == out and [e.path for e in out] == ["wgmma", "dense"]
    first = out[0]
    assert (first.k, first.n, first.bits, first.dtype, first.group_size) == (8192, 1024, 3, "float16", 8192)
    assert first.times_us == {"mma": 3200.0, "wgmma": 1920.0, "dense": 2560.0} and first.rule_path == "wgmma"
    assert first.jax == "9.9" and out[1].times_us == {"dense": 163840.0}


def test_tune_cli_show_and_errors(tmp_path, capsys, monkeypatch):
    path = tmp_path / "t.json"
    assert tune.main(["--show", "--cache", str(path)]) == 0
    assert "no tuning cache" in capsys.readouterr().out
    tuning.write(str(path), [entry(256, "dense", times={"wgmma": 120.0, "dense": 100.0})])
    assert tune.main(["--show", "--cache", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "dense" in out and "1.20x over the rule's" not in out  # rule_path unknown
    with pytest.raises(SystemExit):
        tune.main(["--margin", "-1", "--cache", str(path)])
    with pytest.raises(SystemExit):
        tune.main(["--bits", "5"])
    monkeypatch.setenv(tuning.ENV, "none")
    for show in (["--show"], ["--show", "--dry-run"]):
        with pytest.raises(SystemExit):
            tune.main(show)
    if not gpu_available():
        for cache in (["--cache", str(path)], ["--dry-run"]):  # a dry run needs no cache file
            with pytest.raises(SystemExit):
                tune.main(["--kn", "512x256", "--m", "64", *cache])
            assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(not gpu_available() or not _ffi.with_cuda, reason="needs a GPU")
def test_tuner_on_the_gpu(rng, cache_file, capsys):
    # Two M values of one small problem: every candidate path is timed and checked.
    assert tune.main(["--kn", "4096x2048", "--m", "24,600", "--calls", "3", "--bits", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 entries" in out
    found = {e.m: e for e in tuning.read(str(cache_file))}
    kind = dispatch.gpu_device_kind()
    assert set(found) == {24, 600} and all(e.device_kind == kind for e in found.values())
    assert set(found[24].times_us) == set(tune.candidate_paths(24, _ffi.cuda_has_wgmma()))
    assert "mma" not in found[600].times_us
    for m, e in found.items():
        path = dispatch.gpu_path(m, 4096, 2048, 3, wgmma=_ffi.cuda_has_wgmma(), device_kind=kind,
                                 group_size=128, dtype="bfloat16")
        assert path == e.path
        # and a call there, on the tuned path, is right
        jax.clear_caches()
        qw = random_weight(rng, 4096, 2048, 3, 128, jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal((m, 4096)), jnp.bfloat16)
        y = jax.jit(fj.qgemm)(x, qw)
        assert rel_error(np.asarray(y), reference_qgemm(np.asarray(x), qw)) <= TOLERANCE["bfloat16"]
