"""The GPU path choice (flute_jax.dispatch) and the dense path's numbers, on CPU.

The dense path (dequantize once, then XLA's dot) is what a GPU runs for large M; its
function is checked here on CPU against the float64 reference, and the CUDA lowering
is inspected without a GPU (JAX lowers for a platform it does not have).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from conftest import TOLERANCE, reference_qgemm, rel_error
from flute_jax import _ffi, dense, dispatch
from qgemm_checks import random_weight


@pytest.mark.parametrize(
    "bits,group_size,dtype,k,n,m",
    [
        (4, 128, "bfloat16", 1000, 300, 3),
        (3, 64, "float16", 513, 17, 70),
        (2, -1, "float32", 72, 8, 5),
        (4, 32, "float32", 300, 40, 2),
        (3, 256, "bfloat16", 256, 48, 1),
    ],
)
def test_dense_path_matches_reference(rng, bits, group_size, dtype, k, n, m):
    dtype = jnp.dtype(dtype)
    qw = random_weight(rng, k, n, bits, group_size, dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dense_fn = jax.jit(functools.partial(dense.dense_qgemm, bits=bits, group_size=qw.group_rows, cuda=False))
    y = dense_fn(x, qw.codes, qw.scales, qw.table)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_error(np.asarray(y), reference_qgemm(np.asarray(x), qw)) <= TOLERANCE[dtype.name]


def test_dense_path_propagates_nan(rng):
    qw = random_weight(rng, 256, 16, 4, 128, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32).at[1, 7].set(jnp.nan)
    y = np.asarray(dense.dense_qgemm(x, qw.codes, qw.scales, qw.table, bits=4, group_size=128, cuda=False))
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1]))


def test_choice_is_thresholds_on_m(monkeypatch):
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH", raising=False)
    for m, bits, wgmma in itertools.product((1, 16, dispatch.DECODE_MAX_M), (2, 3, 4), (False, True)):
        assert dispatch.gpu_path(m, 4096, 4096, bits, wgmma=wgmma) == "mma"
    for m in (dispatch.DECODE_MAX_M + 1, 64, dispatch.TILE_MAX_M):
        assert dispatch.gpu_path(m, 4096, 4096, 4, wgmma=True) == "wgmma"
    for m in (dispatch.TILE_MAX_M + 1, 8192):
        assert dispatch.gpu_path(m, 4096, 4096, 4, wgmma=True) == "dense"
    # GPU-specific thresholds, by device kind: the H200 keeps the tile kernel longer.
    h200 = dispatch.TILE_MAX_M_BY_GPU["H200"]
    assert h200 > dispatch.TILE_MAX_M
    assert dispatch.tile_max_m("NVIDIA H200") == h200 and dispatch.tile_max_m("NVIDIA H100 80GB HBM3") == dispatch.TILE_MAX_M
    assert dispatch.gpu_path(h200, 8192, 8192, 4, wgmma=True, device_kind="NVIDIA H200") == "wgmma"
    assert dispatch.gpu_path(h200 + 1, 8192, 8192, 4, wgmma=True, device_kind="NVIDIA H200") == "dense"
    assert dispatch.gpu_path(h200, 8192, 8192, 4, wgmma=True, device_kind="NVIDIA H100 80GB HBM3") == "dense"
    assert dispatch.gpu_path(h200, 8192, 8192, 4, wgmma=False, device_kind="NVIDIA H200") == "dense"
    # ...for large weights only: below 8192 x 8192 elements the H200 keeps the default limit
    small = dispatch.TILE_MIN_WEIGHT_FOR_GPU_MAX - 8 * 1024
    assert dispatch.tile_max_m("NVIDIA H200", small) == dispatch.TILE_MAX_M
    assert dispatch.tile_max_m("NVIDIA H200", dispatch.TILE_MIN_WEIGHT_FOR_GPU_MAX) == h200
    assert dispatch.gpu_path(dispatch.TILE_MAX_M, 8, small // 8, 4, wgmma=True, device_kind="NVIDIA H200") == "wgmma"
    assert dispatch.gpu_path(h200, 4096, 4096, 4, wgmma=True, device_kind="NVIDIA H200") == "dense"
    assert dispatch.gpu_path(h200, 14336, 4096, 4, wgmma=True, device_kind="NVIDIA H200") == "dense"
    assert dispatch.gpu_path(dispatch.DECODE_MAX_M, 4096, 4096, 4, wgmma=True, device_kind="NVIDIA H200") == "mma"
    assert dispatch.gpu_path(dispatch.KERNEL_MAX_M, 4096, 4096, 4, wgmma=False) == "mma"
    for m in (dispatch.KERNEL_MAX_M + 1, 1024, 8192):
        assert dispatch.gpu_path(m, 4096, 4096, 4, wgmma=False) == "dense"
    for forced in dispatch.PATHS:
        monkeypatch.setenv("FLUTE_JAX_GPU_PATH", forced)
        assert dispatch.gpu_path(1, 4096, 4096, 4, wgmma=False) == forced
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", "fastest")
    with pytest.raises(ValueError, match="FLUTE_JAX_GPU_PATH"):
        dispatch.gpu_path(1, 4096, 4096, 4, wgmma=True)


@pytest.mark.skipif(not _ffi.with_cuda, reason="CPU-only build: no CUDA lowering")
@pytest.mark.parametrize(
    "m,path",
    [(1, "mma"), (dispatch.DECODE_MAX_M + 1, None), (dispatch.KERNEL_MAX_M + 1, None)],
)
def test_cuda_lowering_follows_the_choice(rng, monkeypatch, m, path):
    monkeypatch.delenv("FLUTE_JAX_GPU_PATH", raising=False)
    path = path or dispatch.gpu_path(
        m, 512, 64, 4, wgmma=_ffi.cuda_has_wgmma(), device_kind=dispatch.gpu_device_kind()
    )
    qw = random_weight(rng, 512, 64, 4, 128, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((m, 512), jnp.bfloat16)
    text = jax.jit(fj.qgemm).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    assert ("flute_qgemm" in text) == (path != "dense")
    # the dense path: our dequantize kernel, then XLA's dot
    assert ("flute_dequantize" in text) == (path == "dense")
    assert ("dot_general" in text) == (path == "dense")
    if path != "dense":
        assert f"kernel = {int(path == 'wgmma')} : i64" in text


@pytest.mark.skipif(not _ffi.with_cuda, reason="CPU-only build: no CUDA lowering")
@pytest.mark.parametrize("forced", ["mma", "wgmma"])
def test_forced_kernel_reaches_the_custom_call(rng, monkeypatch, forced):
    monkeypatch.setenv("FLUTE_JAX_GPU_PATH", forced)
    jax.clear_caches()  # the path is read at lowering time; an earlier lowering may be cached
    qw = random_weight(rng, 512, 64, 4, 128, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((300, 512), jnp.bfloat16)
    text = jax.jit(fj.qgemm).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    assert f"kernel = {int(forced == 'wgmma')} : i64" in text


def test_cuda_targets_register_command_buffer_compatible(monkeypatch):
    # XLA takes a target's traits from the registration call: without the trait every qgemm
    # would split XLA's CUDA graphs (tests/test_gpu_graph.py runs them inside graphs).
    from jaxlib import xla_client

    assert _ffi._command_buffer_traits() == {"traits": xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE}
    # and a jaxlib without the enum registers without it instead of failing
    monkeypatch.delattr(xla_client, "CustomCallTargetTraits")
    assert _ffi._command_buffer_traits() == {}
