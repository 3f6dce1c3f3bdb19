"""Output epilogues of ``qgemm``: what the kernels apply to their float32 accumulators
before the single rounding to the activation dtype.

``"swiglu"``: the SwiGLU gate of a Llama-style MLP, fused into the gate/up projection.
The weight ``[K, 2 I]`` holds gate and up columns interleaved in blocks of 8: columns
``16 b + i`` are gate column ``8 b + i`` and columns ``16 b + 8 + i`` the matching up
column (``i < 8``); :func:`interleave_gate_up` writes this order. The result is
``silu(x @ gate) * (x @ up)``, ``[..., I]``, computed in float32 from the accumulators.
Eight is the distance between the two output features one thread of the tensor-core
kernels holds, so each pair meets in one thread. A column-parallel shard of the weight
(whole 16-column blocks) holds whole pairs, and its output is the matching slice of
``[..., I]``.

Unfused, the same layer takes a second kernel and writes and reads the ``[M, 2 I]``
projection in between (in the 8B decode step: 32 kernels, ~3% of the step).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

EPILOGUES = ("none", "swiglu")
# The FFI attribute of each epilogue (csrc/epilogue.h).
EPILOGUE_CODES = {"none": 0, "swiglu": 1}
PAIR_BLOCK = 8  # gate and up columns alternate in blocks of this many


def check_epilogue(epilogue: Optional[str]) -> str:
    """``None`` -> ``"none"``; raises ValueError for an unknown name."""
    if epilogue is None:
        return "none"
    if not isinstance(epilogue, str) or epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be None or one of {EPILOGUES}, got {epilogue!r}")
    return epilogue


def check_columns(n: int, epilogue: str, what: str = "the weight") -> None:
    """Raise ValueError if ``epilogue`` cannot apply to ``n`` weight columns."""
    if epilogue == "swiglu" and n % (2 * PAIR_BLOCK):
        raise ValueError(
            f"epilogue='swiglu' needs {what}'s N (= 2 x the MLP width) to be a multiple of "
            f"{2 * PAIR_BLOCK} (gate and up columns interleaved in blocks of {PAIR_BLOCK}), got N={n}"
        )


def output_columns(n: int, epilogue: str) -> int:
    """Columns of the result for ``n`` weight columns."""
    return n // 2 if epilogue == "swiglu" else n


def split_gate_up(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h [..., 2 I]`` in the interleaved order -> ``(gate, up)``, each ``[..., I]``."""
    lead = h.shape[:-1]
    blocks = h.reshape(*lead, h.shape[-1] // (2 * PAIR_BLOCK), 2, PAIR_BLOCK)
    return blocks[..., 0, :].reshape(*lead, -1), blocks[..., 1, :].reshape(*lead, -1)


def apply(h: jax.Array, epilogue: str) -> jax.Array:
    """The epilogue on an unfused result ``h [..., N]``, in h's dtype (use float32 to match
    the kernels, which apply it to their float32 accumulators)."""
    if epilogue == "none":
        return h
    gate, up = split_gate_up(h)
    return jax.nn.silu(gate) * up


def interleave_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``gate, up [K, I]`` (``[in, out]`` kernels, as Flax's Dense) -> ``[K, 2 I]`` in the
    order ``epilogue="swiglu"`` reads: blocks of 8 gate columns, each followed by the 8
    matching up columns. ``I`` must be a multiple of 8. Quantize the result as one weight.
    Leading axes (stacked layers) are kept."""
    gate, up = jnp.asarray(gate), jnp.asarray(up)
    if gate.shape != up.shape or gate.ndim < 2:
        raise ValueError(f"gate and up must be [..., K, I] of one shape, got {gate.shape} and {up.shape}")
    i = gate.shape[-1]
    if i % PAIR_BLOCK:
        raise ValueError(f"the MLP width I must be a multiple of {PAIR_BLOCK}, got {i}")
    lead = gate.shape[:-1]
    g = gate.reshape(*lead, i // PAIR_BLOCK, 1, PAIR_BLOCK)
    u = up.reshape(*lead, i // PAIR_BLOCK, 1, PAIR_BLOCK)
    return jnp.concatenate([g, u], axis=-2).reshape(*lead, 2 * i)
