"""Loads the nanobind extension and registers its XLA FFI targets with JAX.

``flute_qgemm`` is registered for platform ``cpu`` always, and for ``CUDA`` when
the extension was built with nvcc (``with_cuda``).
"""

from __future__ import annotations

import jax

from . import _flute_ffi

QGEMM_TARGET = "flute_qgemm"
with_cuda: bool = bool(_flute_ffi.with_cuda)


def cuda_plan(m: int, k: int, n: int, group_rows: int, is_half: bool) -> dict:
    """The CUDA handler's plan for ``[m, k] @ [k, n]`` on the current GPU.

    Returns ``{"kernel": "flute" | "simple", "grid", "workspace_bytes", "sm_count"}``.
    """
    return dict(_flute_ffi.cuda_plan(m, k, n, group_rows, is_half))

for _name, _capsule in _flute_ffi.cpu_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
for _name, _capsule in _flute_ffi.cuda_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
