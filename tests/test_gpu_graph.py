"""qgemm inside XLA's command buffers (CUDA graphs), on a CUDA GPU (skipped without one).

The CUDA targets are registered command-buffer compatible (flute_jax/_ffi.py), so a
jitted program with several qgemm calls runs them from a CUDA graph that XLA records
once and replays, re-recording when buffer addresses change. A chain of layers,
called again with fresh inputs and fresh weights, must give bitwise the results of
the same layers launched one executable at a time (a lone custom call is below XLA's
minimum graph size, so it is launched directly), and stay near the float64 reference.
Where the dispatch takes the dense path (dequantize + XLA's dot), XLA compiles that dot
per program, so the two agree within a tight tolerance instead of bitwise.

Run on a GPU machine with:  pytest -q tests/test_gpu_graph.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import gpu_available, reference_qgemm, rel_error
from flute_jax import _ffi, dispatch
from qgemm_checks import random_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU"),
]

WIDTHS = (512, 768, 256, 1024, 512, 384)  # a 5-layer chain: [M, 512] -> ... -> [M, 384]


def _layers(rng, bits, group_size, dtype):
    return [random_weight(rng, k, n, bits, group_size, dtype) for k, n in zip(WIDTHS[:-1], WIDTHS[1:])]


def _chain(x, weights):
    for i, qw in enumerate(weights):
        x = fj.qgemm(x, qw)
        if i + 1 < len(weights):
            x = jnp.tanh(x / 8)  # elementwise fusions between the calls (bounded, zero-mean)
    return x


@pytest.mark.parametrize("m", [1, 16, 40, 300])
@pytest.mark.parametrize("bits,group_size,dtype", [(4, 128, "bfloat16"), (3, 64, "float16"), (2, -1, "bfloat16")])
def test_chain_in_command_buffer_equals_single_calls(rng, m, bits, group_size, dtype):
    gpu = jax.devices("gpu")[0]
    chain = jax.jit(_chain)
    one = jax.jit(fj.qgemm)
    act = jax.jit(lambda y: jnp.tanh(y / 8))
    for _ in range(3):  # fresh x and weights each time: new buffer addresses for the graph
        weights = jax.device_put(_layers(rng, bits, group_size, jnp.dtype(dtype)), gpu)
        x = jax.device_put(jnp.asarray(rng.standard_normal((m, WIDTHS[0])), dtype), gpu)
        y_graph = np.asarray(chain(x, weights))
        h_in = x  # the last layer's input, one executable per call
        for qw in weights[:-1]:
            h_in = act(one(h_in, qw))
        y_single = np.asarray(one(h_in, weights[-1]))
        path = dispatch.gpu_path(m, WIDTHS[-2], WIDTHS[-1], bits, wgmma=_ffi.cuda_has_wgmma(),
                                 device_kind=dispatch.gpu_device_kind())
        if path == "dense":
            # Dequantize + XLA's dot: XLA fuses and tiles that dot by program, so two
            # programs need not agree bitwise (one bf16/f16 ulp seen on an H200).
            assert rel_error(np.asarray(y_graph, np.float64), np.asarray(y_single, np.float64)) < 1e-3
        else:
            np.testing.assert_array_equal(y_graph, y_single)  # our kernels: the same bits
        # and the last layer agrees with the float64 reference on its own input
        ref = reference_qgemm(np.asarray(h_in, np.float64), weights[-1])
        assert rel_error(np.asarray(y_graph, np.float64), ref) < (1e-2 if dtype == "bfloat16" else 2e-3)


def test_graph_replay_is_repeatable(rng):
    gpu = jax.devices("gpu")[0]
    weights = jax.device_put(_layers(rng, 4, 64, jnp.bfloat16), gpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, WIDTHS[0])), jnp.bfloat16), gpu)
    chain = jax.jit(_chain)
    first = np.asarray(chain(x, weights))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(chain(x, weights)), first)
