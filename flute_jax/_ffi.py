"""Loads the nanobind extension and registers its XLA FFI targets with JAX.

``flute_qgemm`` is registered for platform ``cpu`` always, and for ``CUDA`` when
the extension was built with nvcc (``with_cuda``).
"""

from __future__ import annotations

import jax
import numpy as np
from jaxlib import xla_client  # CustomCallTargetTraits

from . import _flute_ffi

QGEMM_TARGET = "flute_qgemm"
with_cuda: bool = bool(_flute_ffi.with_cuda)


def cuda_plan(m: int, k: int, n: int, group_rows: int, bits: int, dtype, *, wgmma: bool = False) -> dict:
    """The CUDA handler's plan for ``[m, k] @ [k, n]`` on the current GPU.

    ``dtype`` is x's dtype; ``wgmma`` asks for the tile kernel (granted on compute
    capability 9.0). Returns ``{"kernel": "flute" | "flute_wgmma" | "simple", "grid",
    "column_n", "workspace_bytes"}`` (always "simple" in a build without CUDA).
    """
    return dict(_flute_ffi.cuda_plan(m, k, n, group_rows, bits, str(np.dtype(dtype)), bool(wgmma)))


def cuda_has_wgmma() -> bool:
    """Whether the current GPU runs the wgmma tile kernel (False without a GPU or CUDA)."""
    return bool(_flute_ffi.cuda_has_wgmma())


def _command_buffer_traits() -> dict:
    """The registration keyword that lets XLA record our CUDA calls into command buffers.

    XLA takes a target's traits from the registration call, not from the handler's own
    metadata (csrc declares kCmdBufferCompatible too). Without it, every qgemm splits
    XLA's CUDA graphs and is launched from the host: in the 8B decode step (128 qgemm
    calls) the GPU then sat idle ~1 ms of a 4.4 ms step (H100, tools/profile_step.py).
    The handlers are graph-safe: their launches depend only on static shapes and the
    buffers XLA passes, and they allocate nothing.
    """
    traits = getattr(getattr(xla_client, "CustomCallTargetTraits", None), "COMMAND_BUFFER_COMPATIBLE", None)
    return {} if traits is None else {"traits": traits}


# State types first: the CUDA qgemm handler keeps its call site's Stream-K counters
# (csrc/call_counters.h) as FFI state.
for _name, _registration in _flute_ffi.cuda_types().items():
    jax.ffi.register_ffi_type(_name, _registration, platform="CUDA")
for _name, _capsule in _flute_ffi.cpu_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
for _name, _capsule in _flute_ffi.cuda_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA", **_command_buffer_traits())
