"""Every bad input raises a clear error at trace time; the C++ side re-checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj
from flute_jax.primitive import qgemm_p


@pytest.fixture
def qw(rng):
    return fj.quantize(rng.standard_normal((100, 40)).astype(np.float32), bits=4, group_size=32)


def test_quantize_rejects_bad_arguments(rng):
    w = rng.standard_normal((64, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="bits"):
        fj.quantize(w, bits=5)
    with pytest.raises(ValueError, match="bits"):
        fj.quantize(w, bits=True)
    with pytest.raises(ValueError, match="group_size"):
        fj.quantize(w, group_size=48)
    with pytest.raises(ValueError, match="shape"):
        fj.quantize(w, bits=3, table=np.arange(16.0))
    with pytest.raises(ValueError, match="unknown table"):
        fj.quantize(w, table="nf5")
    with pytest.raises(ValueError, match="finite"):
        fj.quantize(w, bits=2, table=[0.0, 1.0, np.nan, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        fj.quantize(w, dtype=jnp.int8)
    with pytest.raises(ValueError, match="2-D"):
        fj.quantize(w[0])
    with pytest.raises(TypeError, match="float"):
        fj.quantize(np.ones((4, 4), np.int32))
    bad = w.copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite scales"):
        fj.quantize(bad)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite scales"):
        fj.quantize(bad)
    with pytest.raises(ValueError, match="non-finite scales"):
        fj.quantize(w * 1e6, dtype=jnp.float16)  # absmax overflows float16


def test_qgemm_rejects_bad_x(qw):
    with pytest.raises(ValueError, match=r"\[\.\.\., 100\]"):
        fj.qgemm(jnp.ones((3, 99), jnp.bfloat16), qw)
    with pytest.raises(ValueError, match=r"\[\.\.\., 100\]"):
        fj.qgemm(jnp.ones((), jnp.bfloat16), qw)
    with pytest.raises(TypeError, match="x dtype"):
        fj.qgemm(jnp.ones((3, 100), jnp.int32), qw)
    with pytest.raises(TypeError, match="x dtype"):
        fj.qgemm(jnp.ones((3, 100), jnp.float64 if jax.config.x64_enabled else jnp.int8), qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        fj.qgemm(jnp.ones((3, 100)), {"codes": qw.codes})


def test_qgemm_rejects_inconsistent_weight(qw):
    x = jnp.ones((2, 100), jnp.bfloat16)
    cases = {
        "codes": dataclasses.replace(qw, codes=qw.codes[:, :1]),
        "uint32": dataclasses.replace(qw, codes=qw.codes.astype(jnp.int32)),
        "scales": dataclasses.replace(qw, scales=qw.scales[:2]),
        "table": dataclasses.replace(qw, table=qw.table[:8]),
        "bits": dataclasses.replace(qw, bits=3),
        "group_size": dataclasses.replace(qw, group_size=100),
        "shape": dataclasses.replace(qw, shape=(100, 41)),
    }
    for what, bad in cases.items():
        with pytest.raises(ValueError, match=what if what not in ("uint32", "bits") else "codes"):
            jax.jit(fj.qgemm)(x, bad)
    with pytest.raises(TypeError, match="dtype"):
        fj.qgemm(x, dataclasses.replace(qw, table=qw.table.astype(jnp.float32)))


def test_ffi_handler_rechecks_shapes(qw):
    # Bypass the Python checks: bind the primitive with a mismatched scales array.
    # The C++ handler must return an FFI error (a Python exception), not crash.
    x = jnp.ones((2, 100), jnp.float32)
    with pytest.raises(Exception, match="flute_qgemm: scales must have 4 rows"):
        jax.block_until_ready(
            qgemm_p.bind(x, qw.codes, qw.scales[:3].astype(jnp.float32), qw.table.astype(jnp.float32),
                         bits=4, group_size=32, epilogue="none")
        )
    with pytest.raises(Exception, match="flute_qgemm: codes must be"):
        jax.block_until_ready(
            qgemm_p.bind(x, qw.codes[:, :2], qw.scales.astype(jnp.float32), qw.table.astype(jnp.float32),
                         bits=4, group_size=32, epilogue="none")
        )
    with pytest.raises(Exception, match="flute_qgemm: scales, table and y must have x's dtype"):
        jax.block_until_ready(qgemm_p.bind(x, qw.codes, qw.scales, qw.table, bits=4, group_size=32, epilogue="none"))
