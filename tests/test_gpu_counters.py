"""The Stream-K counters a qgemm call site owns (csrc/call_counters.h), on a CUDA GPU.

Since v12 a split column's arrival counter lives in the call site's FFI state, is zeroed
once (FFI initialize stage), and is set back to zero by the block that completes the
column. These tests check what that design promises (skipped without a GPU):
- no counter-zeroing kernel runs with a call;
- one call site used many times, directly and inside a `fori_loop` (a while loop in XLA),
  gives the bits of independent calls: a counter left non-zero would make a later call
  finish a column early, or never;
- the results are bitwise those of the old path (`FLUTE_JAX_COUNTERS=workspace`: workspace
  counters zeroed per launch) and of plain launches (`FLUTE_JAX_PDL_PRIOR=0`), computed in a
  subprocess because the variables are read once;
- a call whose operands the kernel just before it wrote reads them (on sm_90 the FLUTE
  kernel starts as a programmatic dependent of that kernel and must wait for it first).

Run on a GPU machine with:  pytest -q tests/test_gpu_counters.py
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from flute_jax import _ffi, dispatch
from flute_jax.bench import trace
from conftest import gpu_available, reference_qgemm, rel_error
from qgemm_checks import random_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU"),
]

# (M, K, N, bits, group): every one splits columns over several blocks (more blocks than
# columns), so the counters are used. M = 1 and 16 run the decode kernel, 40 the tile
# kernel on Hopper (else two decode launches of 32 and 8 rows on one call site's counters).
CASES = [(1, 4096, 4096, 4, 128), (16, 2048, 1024, 3, 64), (40, 1024, 2048, 2, 128)]
LOOP_CASES = [(1, 4096, 4096, 4, 128), (16, 1024, 2048, 3, 64)]  # N >= K: y feeds the next x


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


def _kernel_names(fn, *args) -> list:
    """Names of the device kernels one call of `fn(*args)` runs (JAX profiler trace)."""
    jax.block_until_ready(fn(*args))  # compiled, and the counters reserved, before the trace
    with tempfile.TemporaryDirectory(prefix="flute_counters_trace_") as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        events = trace.load_events(trace.find_trace_file(log_dir))
    return [e["name"] for e in trace.device_events(events).events]


def test_plan_splits_columns(gpu):
    # The cases below exercise the counters only if their columns are split.
    for m, k, n, bits, group in CASES + LOOP_CASES:
        path = dispatch.gpu_path(m, k, n, bits, wgmma=_ffi.cuda_has_wgmma())
        plan = _ffi.cuda_plan(m, k, n, group, bits, jnp.bfloat16, wgmma=path == "wgmma")
        assert plan["kernel"] in ("flute", "flute_wgmma"), (m, k, n, plan)
        columns = plan["row_tiles"] * -(-n // plan["column_n"])
        assert plan["grid"] > columns, (m, k, n, plan)  # more blocks than columns: splits


def test_no_counter_zeroing_kernel(rng, gpu):
    qw = jax.device_put(random_weight(rng, 4096, 4096, 4, 128, jnp.bfloat16), gpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16), gpu)
    names = _kernel_names(jax.jit(fj.qgemm), x, qw)
    assert any("FluteQgemmKernel" in name for name in names), names
    assert not any("ZeroCounters" in name for name in names), names


@pytest.mark.parametrize("m,k,n,bits,group", CASES)
def test_one_call_site_many_calls(rng, gpu, m, k, n, bits, group):
    qw = jax.device_put(random_weight(rng, k, n, bits, group, jnp.bfloat16), gpu)
    f = jax.jit(fj.qgemm)
    xs = [jax.device_put(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), gpu) for _ in range(4)]
    first = [np.asarray(f(x, qw)) for x in xs]
    for x, y0 in zip(xs, first):
        ref = reference_qgemm(np.asarray(x, np.float64), qw)
        assert rel_error(np.asarray(y0, np.float64), ref) < 1e-2
    for _ in range(5):  # the same call site again and again: same bits every time
        for x, y0 in zip(xs, first):
            np.testing.assert_array_equal(np.asarray(f(x, qw)), y0)


@pytest.mark.parametrize("m,k,n,bits,group", LOOP_CASES)
def test_call_site_in_a_loop(rng, gpu, m, k, n, bits, group):
    # One call site runs every iteration of the loop; each iteration's result must be
    # the bits of a lone call on the same input.
    qw = jax.device_put(random_weight(rng, k, n, bits, group, jnp.bfloat16), gpu)
    x0 = jax.device_put(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), gpu)
    steps = 12

    def step(i, carry):
        x, ys = carry
        y = fj.qgemm(x, qw)
        ys = ys.at[i].set(y)
        return jnp.tanh(y[:, :k] / 8), ys  # bounded, fresh input for the next iteration

    ys0 = jnp.zeros((steps, m, n), jnp.bfloat16)
    _, ys = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, (x, ys0)))(x0)
    ys = np.asarray(ys)
    one = jax.jit(fj.qgemm)
    act = jax.jit(lambda y: jnp.tanh(y[:, :k] / 8))
    x = x0
    for i in range(steps):
        y = one(x, qw)
        np.testing.assert_array_equal(ys[i], np.asarray(y))
        x = act(y)


_FRESH_PROCESS_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
import flute_jax as fj
data = np.load(sys.argv[1])
raw = lambda name: data[name].view(jnp.dtype(str(data[name + "_dtype"])))  # bf16 travels as raw bits
qw = fj.QuantizedWeight(codes=jnp.asarray(data["codes"]), scales=jnp.asarray(raw("scales")),
                        table=jnp.asarray(raw("table")), bits=int(data["bits"]),
                        group_size=int(data["group_size"]), shape=tuple(int(s) for s in data["shape"]))
np.save(sys.argv[2], np.asarray(jax.jit(fj.qgemm)(jnp.asarray(raw("x")), qw)).view(np.uint16))
"""


@pytest.mark.parametrize("variable,value", [("FLUTE_JAX_COUNTERS", "workspace"), ("FLUTE_JAX_PDL_PRIOR", "0")])
@pytest.mark.parametrize("m,k,n,bits,group", CASES)
def test_same_bits_as_other_launches(rng, gpu, m, k, n, bits, group, variable, value, tmp_path):
    qw = random_weight(rng, k, n, bits, group, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = np.asarray(jax.jit(fj.qgemm)(jax.device_put(x, gpu), jax.device_put(qw, gpu)))
    inputs, output = tmp_path / "inputs.npz", tmp_path / "y.npy"
    arrays = {}
    for name, a in (("scales", qw.scales), ("table", qw.table), ("x", x)):
        a = np.asarray(a)
        arrays[name], arrays[name + "_dtype"] = a.view(f"u{a.dtype.itemsize}"), str(a.dtype)
    np.savez(inputs, codes=np.asarray(qw.codes), bits=qw.bits, group_size=qw.group_size,
             shape=np.asarray(qw.shape), **arrays)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **{variable: value})
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(inputs), str(output)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(output), y.view(np.uint16))


@pytest.mark.parametrize("m,k,n,bits,group", CASES)
def test_operands_written_just_before(rng, gpu, m, k, n, bits, group):
    # Every operand is made by a fusion inside the same executable, right before the call:
    # x times 2, the table and the scales times 2, the codes xor a run-time zero. Powers of
    # two are exact, so y must be 8x the call on the operands made beforehand, to the bit.
    # An operand read before the fusion that writes it ends would be its stale (fresh,
    # never written) buffer.
    qw = jax.device_put(random_weight(rng, k, n, bits, group, jnp.bfloat16), gpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), gpu)
    y = np.asarray(jax.jit(fj.qgemm)(x, qw)).astype(np.float32)

    @jax.jit
    def made_inside(x, qw, two, zero):
        made = dataclasses.replace(qw, codes=qw.codes ^ zero, scales=qw.scales * two, table=qw.table * two)
        return fj.qgemm(x * two, made)

    for _ in range(3):
        y8 = made_inside(x, qw, jnp.bfloat16(2), jnp.uint32(0))
        np.testing.assert_array_equal(np.asarray(y8).astype(np.float32), 8 * y)
