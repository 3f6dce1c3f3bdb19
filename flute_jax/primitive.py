"""The ``flute_qgemm`` JAX primitive: abstract evaluation and lowering to XLA FFI.

Operands (all arrays; checked in :mod:`flute_jax.ops` before binding):
  x      ``[M, K]`` float16 / bfloat16 / float32
  codes  ``uint32[ceil(K/256), ceil(N/16), 128*bits]`` (packed layout)
  scales ``[G, N]`` in x's dtype
  table  ``[2**bits]`` in x's dtype
Params: ``bits``, ``group_size`` (K rows per scale group, already resolved from -1) and
``epilogue`` (``"none"`` or ``"swiglu"``, :mod:`flute_jax.epilogue`).
Result: ``y [M, N]`` in x's dtype (``[M, N/2]`` with ``"swiglu"``); K comes from x, N from scales.

The CPU lowering calls the threaded C++ handler. The CUDA lowering calls the CUDA
handler with the kernel to run (decode or tile), or dequantizes once (our CUDA
kernel) and lets XLA's dot run (:mod:`flute_jax.dense`); the choice is
:func:`flute_jax.dispatch.gpu_path`. All compute the same
function within the format's tolerances (float32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import _ffi, dispatch
from . import epilogue as epilogues
from .dense import dense_qgemm

qgemm_p = Primitive("flute_qgemm")


def _abstract_eval(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    return jax.core.ShapedArray((x.shape[0], epilogues.output_columns(scales.shape[1], epilogue)), x.dtype)


def _impl(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    # Eager calls go through a jit of the primitive, which lowers to the FFI call.
    return jax.jit(functools.partial(qgemm_p.bind, bits=bits, group_size=group_size, epilogue=epilogue))(
        x, codes, scales, table
    )


_ffi_lowering = jax.ffi.ffi_lowering(_ffi.QGEMM_TARGET)


def _lowering(ctx, x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    return _ffi_lowering(ctx, x, codes, scales, table, bits=np.int64(bits), group_size=np.int64(group_size),
                         epilogue=np.int64(epilogues.EPILOGUE_CODES[epilogue]))


def _cuda_lowering(ctx, x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    x_aval, scales_aval = ctx.avals_in[0], ctx.avals_in[2]
    m, k = x_aval.shape
    path = dispatch.gpu_path(
        m, k, scales_aval.shape[1], bits, wgmma=_ffi.cuda_has_wgmma(), device_kind=dispatch.gpu_device_kind(),
        group_size=group_size, dtype=x_aval.dtype.name,
    )
    if path == "dense":
        dense = functools.partial(dense_qgemm, bits=bits, group_size=group_size, cuda=True, epilogue=epilogue)
        return mlir.lower_fun(dense, multiple_results=False)(ctx, x, codes, scales, table)
    # The CUDA handler takes a second result: the Stream-K workspace (partial sums,
    # and arrival counters when the call site has none of its own:
    # csrc/call_counters.h). XLA allocates it like any temporary, so the execute
    # stage never allocates and stays CUDA-graph safe. Its size comes from the same
    # C++ plan the handler follows; only y is returned.
    wgmma = path == "wgmma"
    plan = _ffi.cuda_plan(m, k, scales_aval.shape[1], group_size, bits, x_aval.dtype, wgmma=wgmma)
    workspace = jax.core.ShapedArray((max(16, plan["workspace_bytes"]),), np.uint8)
    ctx = ctx.replace(avals_out=[ctx.avals_out[0], workspace])
    y, _ = _ffi_lowering(
        ctx, x, codes, scales, table, bits=np.int64(bits), group_size=np.int64(group_size), kernel=np.int64(wgmma),
        epilogue=np.int64(epilogues.EPILOGUE_CODES[epilogue]),
    )
    return [y]


qgemm_p.def_abstract_eval(_abstract_eval)
qgemm_p.def_impl(_impl)
mlir.register_lowering(qgemm_p, _lowering, platform="cpu")
if _ffi.with_cuda:
    mlir.register_lowering(qgemm_p, _cuda_lowering, platform="cuda")
