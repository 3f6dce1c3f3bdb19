"""``jax.vmap`` rules for the qgemm primitives.

Two cases:

* Only ``x`` is batched (the common one: extra batch axes of activations).
  The batch axis is folded into M, ``[B, M, K] -> [B*M, K]``, and the kernel
  runs once: a vmapped qgemm costs the same as one qgemm with a larger M.
* A weight operand (codes, scales or table) is batched: stacked weights such
  as experts or layers. Each weight is a separate kernel call, run in
  sequence with ``lax.map`` over the weight batch; ``x`` is sliced along with
  the weights when it is batched too, and shared otherwise. Result ``[B, M, N]``.
"""

from __future__ import annotations

from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching


def _front(v, d):
    """Move batch axis ``d`` of ``v`` to the front (``d`` None: unbatched)."""
    return v if d is None or d == 0 else lax.transpose(v, (d, *[i for i in range(v.ndim) if i != d]))


def make_batching_rule(prim: Primitive):
    """The batching rule of ``prim``."""

    def rule(args, dims, **params):
        x, codes, scales, table = (_front(v, d) for v, d in zip(args, dims))
        bx, bc, bs, bt = dims
        if bc is None and bs is None and bt is None:
            b, m, k = x.shape
            y = prim.bind(x.reshape(b * m, k), codes, scales, table, **params)
            return y.reshape(b, m, y.shape[-1]), 0

        batched = [d is not None for d in dims]
        operands = (x, codes, scales, table)
        mapped = tuple(v for v, is_b in zip(operands, batched) if is_b)

        def one(slices):
            it = iter(slices)
            full = [next(it) if is_b else v for v, is_b in zip(operands, batched)]
            return prim.bind(*full, **params)

        return lax.map(one, mapped), 0

    return rule


def register(prim: Primitive) -> None:
    """Install the batching rule on a qgemm-signature primitive."""
    batching.primitive_batchers[prim] = make_batching_rule(prim)
