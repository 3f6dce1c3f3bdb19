"""Shared test setup: 8 simulated CPU devices (for sharding tests) and references.

XLA_FLAGS must be set before JAX initialises its backends, so it is set here,
at import of the test session, not inside a test.
"""

import os
import zlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# No tuning cache of the machine's user decides a path in the tests (they expect the
# rule's); the tests of the cache point this at a file of their own.
os.environ["FLUTE_JAX_TUNING_CACHE"] = "none"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import flute_jax as fj  # noqa: E402

# Relative Frobenius error bounds of the format issue.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}


def reference_qgemm(x, qw) -> np.ndarray:
    """float64 ``x @ W_hat`` from the dequantized weight (W_hat formed in float64)."""
    codes = np.asarray(fj.layout.unpack(qw.codes, qw.bits, qw.shape)).astype(np.int64)
    table = np.asarray(qw.table.astype(np.float32), np.float64)
    scales = np.asarray(qw.scales.astype(np.float32), np.float64)
    k = qw.shape[0]
    w_hat = table[codes] * np.repeat(scales, qw.group_rows, axis=0)[:k]
    return np.asarray(x.astype(np.float32), np.float64) @ w_hat


def rel_error(y, ref) -> float:
    y = np.asarray(y.astype(np.float32), np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def random_table(rng, bits: int) -> np.ndarray:
    """A random sorted table with distinct entries (not NF), absmax about 1."""
    return np.sort(rng.uniform(-1.0, 1.0, 2**bits))


def gpu_available() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.fixture
def rng(request):
    # A fresh, test-specific seed: every test draws its own inputs.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
