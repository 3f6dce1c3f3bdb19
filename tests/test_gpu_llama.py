"""The FLUTE kernel on Llama-3 linear-layer shapes (skipped without a GPU).

Every (K, N) of the Llama-3 8B / 70B / 405B linear layers and their tensor-parallel
slices (TP 1, 2, 4, 8); M in 1, 3, 16, 32 (decode kernel) and one of 64, 96, 160 per
(shape, bits) (the tile kernel on Hopper); bits 2, 3, 4; group sizes 64, 128, -1;
float16 and bfloat16; random tables, codes and scales. The float64 reference is
computed on the GPU (x64) from the codes, so large shapes stay cheap.

    pytest -q tests/test_gpu_llama.py
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

import flute_jax as fj
from flute_jax import _ffi
from conftest import TOLERANCE, gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]

# (in features K, out features N) at TP=1; column-parallel layers split N, row-parallel split K.
LLAMA3 = {
    "8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "up": (4096, 14336),
           "down": (14336, 4096)},
    "70b": {"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 57344), "up": (8192, 28672),
            "down": (28672, 8192)},
    "405b": {"qkv": (16384, 18432), "o": (16384, 16384), "up": (16384, 53248), "down": (53248, 16384)},
}
ROW_PARALLEL = {"o", "down"}


def llama_shapes():
    shapes = set()
    for layers in LLAMA3.values():
        for name, (k, n) in layers.items():
            for tp in (1, 2, 4, 8):
                shapes.add((k // tp, n) if name in ROW_PARALLEL else (k, n // tp))
    return sorted(shapes)


SHAPES = llama_shapes()
MS = (1, 3, 16, 32)
TILE_MS = (64, 96, 160)  # one per (shape, bits): keeps the compile count down
COMBOS = list(itertools.product((64, 128, -1), ("bfloat16", "float16")))  # (group size, dtype)


def test_enough_shapes():
    assert len(SHAPES) >= 50


@pytest.fixture(scope="module")
def gpu():
    return jax.devices("gpu")[0]


@functools.partial(jax.jit, static_argnums=4)
def _reference(x64, codes, table64, scales64, group_rows):
    w = table64[codes] * jnp.repeat(scales64, group_rows, axis=0)[: codes.shape[0]]
    return x64 @ w


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_llama_shape(gpu, index):
    k, n = SHAPES[index]
    key = jax.random.key(1000 + index)
    # Each shape sees every bits value, each with a rotating (group size, dtype).
    for bits in (2, 3, 4):
        group_size, dtype_name = COMBOS[(3 * index + bits) % len(COMBOS)]
        dtype = jnp.dtype(dtype_name)
        group_rows = k if group_size == -1 else group_size
        assert _ffi.cuda_plan(32, k, n, group_rows, bits, dtype)["kernel"] == "flute"
        ms = MS + (TILE_MS[(index + bits) % len(TILE_MS)],)
        if _ffi.cuda_has_wgmma():
            assert _ffi.cuda_plan(ms[-1], k, n, group_rows, bits, dtype, wgmma=True)["kernel"] == "flute_wgmma"
        key, kc, ks, kt, kx = jax.random.split(key, 5)
        with jax.default_device(gpu):
            codes = jax.random.randint(kc, (k, n), 0, 2**bits, jnp.uint8)
            groups = 1 if group_size == -1 else -(-k // group_size)
            scales = jax.random.uniform(ks, (groups, n), jnp.float32, -2.0, 2.0).astype(dtype)
            table = jnp.sort(jax.random.uniform(kt, (2**bits,), jnp.float32, -1.0, 1.0)).astype(dtype)
            qw = fj.QuantizedWeight(codes=jax.jit(fj.pack, static_argnums=1)(codes, bits), scales=scales,
                                    table=table, bits=bits, group_size=group_size, shape=(k, n))
            xs = [jax.random.normal(kk, (m, k), jnp.float32).astype(dtype)
                  for kk, m in zip(jax.random.split(kx, len(ms)), ms)]
            ys = [jax.jit(fj.qgemm)(x, qw) for x in xs]
            with jax.enable_x64(True):
                ref = _reference(jnp.concatenate(xs).astype(jnp.float64), codes,
                                 table.astype(jnp.float64), scales.astype(jnp.float64), group_rows)
                offset = 0
                for x, y, m in zip(xs, ys, ms):
                    r = ref[offset : offset + m]
                    offset += m
                    err = float(jnp.linalg.norm(y.astype(jnp.float64) - r) / jnp.linalg.norm(r))
                    assert err <= TOLERANCE[dtype.name], (k, n, m, bits, group_size, dtype.name, err)
                    again = jax.jit(fj.qgemm)(x, qw)
                    assert bool(jnp.all(jax.lax.bitcast_convert_type(again, jnp.uint16)
                                        == jax.lax.bitcast_convert_type(y, jnp.uint16))), "not bitwise repeatable"
