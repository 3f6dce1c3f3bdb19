"""Sharding of qgemm: ``custom_partitioning`` rules and ``shard_specs``.

``flute_jax.qgemm`` binds :data:`qgemm_spmd_p`, the primitive that JAX's
transformations see (its AD and vmap rules live in :mod:`flute_jax.autodiff`
and :mod:`flute_jax.batching`). It lowers through
``jax.experimental.custom_partitioning`` to the kernel primitive
:data:`flute_jax.primitive.qgemm_p`:

* single device, or inside a fully manual ``shard_map``: custom_partitioning
  lowers its body directly, so the compiled program holds just the kernel's
  custom call;
* several devices: a Shardy ``sharding_rule`` tells the propagation how the
  operands' dimensions relate, and the ``partition`` callback runs one local
  kernel per device on the local slices of the packed weight (which are valid
  packed weights, see :mod:`flute_jax.layout`), so packed weights are never
  gathered.

Supported shardings (``x[M, K]``, ``codes[K/256, N/16, words]``, ``scales[G, N]``):

==============================  ========================================  =================
sharded                         local work                                communication
==============================  ========================================  =================
x's M (batch)                   qgemm on local rows                       none
weights' N (column parallel)    qgemm on local N-blocks, y sharded on N   none
weights' K (row parallel)       qgemm on local K-blocks, float32 partial  one all-reduce
any mix on a 2-D+ mesh          all of the above                          psum over K axes
==============================  ========================================  =================

A weight sharding must cut whole packed blocks and whole scale groups: K
shards of a multiple of 256 rows (every supported group size divides 256; a
``group_size=-1`` weight keeps its single scale row replicated), N shards of
a multiple of 16 columns. Anything else is rejected with a ValueError, at
:func:`shard_specs` time or when the program is partitioned.

The K-sharded psum adds float32 partial products (one rounding to the output
dtype at the end). XLA's all-reduce combines the shards in a fixed order for
a given mesh and shape on CPU and with NCCL on GPU, and hands every device
the same result, so repeated runs give the same bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from . import autodiff, batching, layout
from . import epilogue as epilogues
from .primitive import qgemm_p
from .quantize import QuantizedWeight, check_group_size, num_groups
from .tables import check_bits

AxisSpec = Union[None, str, Sequence[str]]

__all__ = ["local_weight", "qgemm_rule", "qgemm_spmd_p", "shard_specs"]


# --------------------------------------------------------------------------
# Local (per-shard) weights
# --------------------------------------------------------------------------


def local_weight(qw: QuantizedWeight, k: int) -> QuantizedWeight:
    """Validate ``qw`` for an activation with ``k`` input features.

    Returns ``qw`` itself when its arrays have the full logical shape. Inside
    ``shard_map`` the arrays are a device's slice while the static ``shape``
    stays global; such a slice (whole 256-row K-blocks, whole 16-column
    N-blocks, whole scale groups) is accepted and returned as a weight of the
    local shape ``(k, scales.shape[1])``. Raises the full-shape ValueError /
    TypeError otherwise.
    """
    try:
        return qw.validate()
    except ValueError as full_error:
        local = _as_local_slice(qw, k)
        if local is None:
            raise full_error
        return local


def _as_local_slice(qw: QuantizedWeight, k_local: int) -> Optional[QuantizedWeight]:
    check_bits(qw.bits)
    check_group_size(qw.group_size)
    if len(qw.shape) != 2 or getattr(qw.scales, "ndim", 0) != 2:
        return None
    k_full, n_full = qw.shape
    n_local = qw.scales.shape[1]
    if (k_local, n_local) == (k_full, n_full):
        return None
    if not (0 < k_local <= k_full and 0 < n_local <= n_full):
        return None
    if k_local != k_full and (k_local % layout.BLOCK_K or k_full % k_local):
        return None
    if n_local != n_full and (n_local % layout.BLOCK_N or n_full % n_local):
        return None
    # group_size -1 keeps one (replicated) scale row per shard; grouped weights
    # keep their group size, which divides the 256-row K-blocks.
    local = dataclasses.replace(qw, shape=(k_local, n_local))
    try:
        return local.validate()
    except ValueError:
        return None


# --------------------------------------------------------------------------
# The primitive that transformations see
# --------------------------------------------------------------------------

qgemm_spmd_p = Primitive("flute_qgemm_spmd")
"""``flute_qgemm_spmd``: same operands, params and result as :data:`qgemm_p`;
lowered through ``custom_partitioning`` so it shards without gathering weights."""


def _impl(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    return jax.jit(functools.partial(qgemm_spmd_p.bind, bits=bits, group_size=group_size, epilogue=epilogue))(
        x, codes, scales, table
    )


def _kernel(x, codes, scales, table, bits, group_size, epilogue):
    """The body of the custom_partitioning op: one kernel call on whole arrays."""
    return qgemm_p.bind(x, codes, scales, table, bits=bits, group_size=group_size, epilogue=epilogue)


_partitioned = custom_partitioning(_kernel, static_argnums=(4, 5, 6))


def _spmd(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    return _partitioned(x, codes, scales, table, bits, group_size, epilogue)


def _kernel_kw(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    return _kernel(x, codes, scales, table, bits, group_size, epilogue)


_lower_kernel = mlir.lower_fun(_kernel_kw, multiple_results=False)
_lower_spmd = mlir.lower_fun(_spmd, multiple_results=False)


def _spmd_lowering(ctx, x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    # One device: the kernel's custom call and nothing else (custom_partitioning
    # would do the same, but only once it knows the devices).
    lower = _lower_kernel if getattr(ctx.module_context.axis_context, "num_devices", None) == 1 else _lower_spmd
    return lower(ctx, x, codes, scales, table, bits=bits, group_size=group_size, epilogue=epilogue)


def _abstract_eval(x, codes, scales, table, *, bits: int, group_size: int, epilogue: str):
    shape = (x.shape[0], epilogues.output_columns(scales.shape[1], epilogue))
    sharding = autodiff._explicit_sharding(x)
    if sharding is None:
        return jax.core.ShapedArray(shape, x.dtype)
    # Explicit mesh axes (sharding in types): y keeps x's batch sharding and the
    # weight's N sharding; a K sharding is summed away inside the op.
    w_axes = _dim_axes(codes.sharding, 0) + _dim_axes(codes.sharding, 1)
    m_axes = tuple(a for a in _dim_axes(x.sharding, 0) if a not in w_axes)
    spec = PartitionSpec(_spec_entry(m_axes), _spec_entry(_dim_axes(codes.sharding, 1)))
    return jax.core.ShapedArray(shape, x.dtype, sharding=NamedSharding(sharding.mesh, spec))


qgemm_spmd_p.def_abstract_eval(_abstract_eval)
qgemm_spmd_p.def_impl(_impl)
mlir.register_lowering(qgemm_spmd_p, _spmd_lowering)
# custom_partitioning needs the device assignment at lowering time. JAX's own
# custom-partitioned primitives (cuDNN attention) declare that in this set; there
# is no public API for it.
try:
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.add(qgemm_spmd_p)
except (ImportError, AttributeError):  # pragma: no cover - future JAX
    pass
for _prim in (qgemm_p, qgemm_spmd_p):
    autodiff.register(_prim)
    batching.register(_prim)


# --------------------------------------------------------------------------
# Shardy rule
# --------------------------------------------------------------------------

# One dimension of an operand in the rule: its factors, outermost first, with
# their sizes. Several factors make a compound factor ``(a b)``.
_Dim = Sequence[tuple[str, int]]

# Factors that must stay replicated: a packed block's words, the table, and the
# positions inside one K-block / N-block / block's scale groups (sharding them
# would cut a packed block). The K-blocks (and x's K when it is not a whole
# number of blocks) are contracted: a sharding of them becomes a psum.
_REPLICATED = ("w", "t", "kin", "gin", "nin", "yin")
_REDUCTION = ("k", "kb")


def _rule_string(operands: Sequence[Sequence[_Dim]], results: Sequence[Sequence[_Dim]]):
    """The einsum-like rule string for ``operands -> results``, its factors in
    order of first appearance, and the sizes of the factors that only occur
    inside compound factors (the others take their size from a dimension).

    Shardy rejects a compound factor with a member of size 1 ("dim mapping
    can't have a factor of size 1 if there are multiple factors"), which one
    K-block (K = 256), one N-block (N = 16) or one scale group per block would
    give. A size-1 factor splits nothing, so it is dropped from the compound;
    a dimension left with a single factor gets that factor whole (a dimension
    of size 1 keeps its first factor).
    """
    sizes: dict[str, int] = {}
    whole: set[str] = set()
    order: list[str] = []

    def dim_term(dim: _Dim) -> str:
        kept = [(f, s) for f, s in dim if s != 1] or list(dim[:1])
        order.extend(f for f, _ in kept)
        if len(kept) == 1:
            whole.add(kept[0][0])
            return kept[0][0]
        sizes.update(kept)
        return "(" + " ".join(f for f, _ in kept) + ")"

    def tensor_term(dims: Sequence[_Dim]) -> str:
        return " ".join(dim_term(d) for d in dims)

    rule = ", ".join(map(tensor_term, operands)) + " -> " + ", ".join(map(tensor_term, results))
    return rule, list(dict.fromkeys(order)), {f: s for f, s in sizes.items() if f not in whole}


def _sharding_rule(bits, group_size, epilogue, mesh, operand_types, result_types):
    """custom_partitioning's ``sharding_rule`` callback: :func:`qgemm_rule` of the operand shapes."""
    del bits, group_size, mesh, result_types
    return qgemm_rule(*(tuple(mlir.ir.RankedTensorType(o).shape) for o in operand_types), epilogue=epilogue)


def qgemm_rule(
    x_shape: Sequence[int], codes_shape: Sequence[int], scales_shape: Sequence[int], table_shape: Sequence[int],
    epilogue: str = "none",
) -> tuple[str, dict]:
    """Einsum-like rule relating x, codes, scales, table and y, with its keyword
    arguments (factor sizes, reduction and need-replication factors).

    When K (N) is a whole number of packed blocks, x's K (y's and scales' N)
    dimension is the compound factor (K-blocks, rows in a block), so Shardy
    shards x, codes and scales along the same K-blocks; the in-block factors
    must stay replicated. Otherwise the dimensions get unrelated factors, and
    the partition callback sees (and rejects, or replicates) what arrives.
    Size-1 members of compound factors are left out (:func:`_rule_string`).
    With the swiglu epilogue y's N is (N-blocks, 8 outputs per block): a sharding of the
    weight's N-blocks shards y alike.
    """
    (m, k), (kb, nb, w), (g, n), (t,) = x_shape, codes_shape, scales_shape, table_shape
    if k == kb * layout.BLOCK_K:
        x_k = [("kb", kb), ("kin", layout.BLOCK_K)]
        # Grouped scales: each K-block holds g / kb groups (group sizes divide
        # 256). A single scale row (group_size -1) belongs to no one block.
        s_k = [("g", g)] if g == 1 else [("kb", kb), ("gin", g // kb)]
    else:
        x_k, s_k = [("k", k)], [("g", g)]
    if n == nb * layout.BLOCK_N:
        s_n = y_n = [("nb", nb), ("nin", layout.BLOCK_N)]
        if epilogue == "swiglu":
            y_n = [("nb", nb), ("yin", layout.BLOCK_N // 2)]
    else:  # (never with swiglu, which needs N % 16 == 0)
        s_n, y_n = [("ns", n)], [("n", n)]
    rule, order, sizes = _rule_string(
        operands=[[[("m", m)], x_k], [[("kb", kb)], [("nb", nb)], [("w", w)]], [s_k, s_n], [[("t", t)]]],
        results=[[[("m", m)], y_n]],
    )
    # The MLIR verifier wants the special factors in order of first appearance.
    special = lambda fs: tuple(f for f in order if f in fs)  # noqa: E731
    return rule, dict(reduction_factors=special(_REDUCTION), need_replication_factors=special(_REPLICATED), **sizes)


# --------------------------------------------------------------------------
# Partition callback
# --------------------------------------------------------------------------


def _dim_axes(sharding, dim: int) -> tuple[str, ...]:
    spec = sharding.spec
    entry = spec[dim] if dim < len(spec) else None
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _shards(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _check_weight_split(k, n, g, group_rows, k_shards, n_shards, k_axes, n_axes):
    """Raise if the K / N split would cut a packed block or a scale group."""
    if k_shards > 1:
        if k % (layout.BLOCK_K * k_shards):
            raise ValueError(
                f"flute_jax: cannot shard a QuantizedWeight with K={k} over {k_shards} devices "
                f"(mesh axes {k_axes}): each shard must hold whole {layout.BLOCK_K}-row packed "
                f"K-blocks, so K must be a multiple of {layout.BLOCK_K * k_shards}"
            )
        if g > 1 and (k // k_shards) % group_rows:
            raise ValueError(
                f"flute_jax: K shards of {k // k_shards} rows split scale groups of {group_rows} rows"
            )
    if n_shards > 1 and n % (layout.BLOCK_N * n_shards):
        raise ValueError(
            f"flute_jax: cannot shard a QuantizedWeight with N={n} over {n_shards} devices "
            f"(mesh axes {n_axes}): each shard must hold whole {layout.BLOCK_N}-column packed "
            f"N-blocks, so N must be a multiple of {layout.BLOCK_N * n_shards}"
        )


def _partition(bits, group_size, epilogue, mesh, arg_shapes, result_shape):
    x, codes, scales, table = arg_shapes
    for a in arg_shapes:
        if not isinstance(a.sharding, NamedSharding):
            raise ValueError(
                "flute_jax.qgemm: could not map the operand shardings onto a mesh; run under "
                "jax.set_mesh(mesh), or shard the inputs with NamedSharding"
            )
    m, k = x.shape
    g, n = scales.shape
    if _dim_axes(codes.sharding, 2):
        raise ValueError("flute_jax: the packed codes' last axis (words of one block) cannot be sharded")
    # The weight's K and N shardings come from codes and scales; where one of
    # them is replicated it is sliced locally to match the other (free). Two
    # different shardings would need communication of weights: rejected.
    c_k, c_n = _dim_axes(codes.sharding, 0), _dim_axes(codes.sharding, 1)
    s_k, s_n = _dim_axes(scales.sharding, 0), _dim_axes(scales.sharding, 1)
    if (c_k and s_k and c_k != s_k) or (c_n and s_n and c_n != s_n) or (g == 1 and s_k):
        raise ValueError(
            "flute_jax: a QuantizedWeight's codes and scales are sharded inconsistently "
            f"(codes K/N axes {c_k}/{c_n}, scales {s_k}/{s_n}); shard them with flute_jax.shard_specs"
        )
    k_axes, n_axes = c_k or s_k, c_n or s_n
    expected_scales = ((k_axes if g > 1 else ()), n_axes)
    if set(k_axes) & set(n_axes):
        raise ValueError(f"flute_jax: a mesh axis shards both K and N of the weight: {k_axes}, {n_axes}")
    k_shards, n_shards = _shards(mesh, k_axes), _shards(mesh, n_axes)
    _check_weight_split(k, n, g, group_size, k_shards, n_shards, k_axes, n_axes)
    # Batch rows may use any axis the weight does not.
    m_axes = tuple(a for a in _dim_axes(x.sharding, 0) if a not in k_axes + n_axes)
    if m % _shards(mesh, m_axes):
        m_axes = ()

    def named(*entries):
        return NamedSharding(mesh, PartitionSpec(*(_spec_entry(e) for e in entries)))

    arg_shardings = (
        named(m_axes, k_axes),
        named(k_axes, n_axes, ()),
        named(*expected_scales),
        named(()),
    )
    out_sharding = named(m_axes, n_axes)
    local_group = group_size if g > 1 else k // k_shards

    def lower_fn(x, codes, scales, table):
        if not k_axes:
            return qgemm_p.bind(x, codes, scales, table, bits=bits, group_size=local_group, epilogue=epilogue)
        # float32 partials: one rounding to the output dtype after the sum (and after the
        # epilogue, which needs the whole sum).
        y = qgemm_p.bind(x, codes, scales, table, bits=bits, group_size=local_group, epilogue="none")
        with _auto_axes(mesh):
            y = lax.psum(y.astype(jnp.float32), k_axes)
            return epilogues.apply(y, epilogue).astype(x.dtype)

    return mesh, lower_fn, out_sharding, arg_shardings


def _auto_axes(mesh):
    """A context in which the local program traces with the mesh's axes Auto.

    Under ``jax.set_mesh`` of a mesh with Explicit axes (``jax.make_mesh``'s default),
    JAX 0.11 annotates every op of the partition's local program with a sharding
    custom-call: in psum's reduction region XLA then rejects the all-reduce
    ("Unsupported reduction computation", CPU), and on CUDA the epilogue's ops find no
    implementation of the "Sharding" custom call (H200, session 26). The local program
    runs per device: its axes need no types.
    """
    use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if use_abstract_mesh is None or axis_type is None:  # older JAX: no typed axes to clear
        return contextlib.nullcontext()
    names = tuple(mesh.axis_names)
    return use_abstract_mesh(jax.sharding.AbstractMesh(
        tuple(mesh.shape[a] for a in names), names, axis_types=(axis_type.Auto,) * len(names)))


_partitioned.def_partition(partition=_partition, sharding_rule=_sharding_rule)


# --------------------------------------------------------------------------
# User-facing PartitionSpecs
# --------------------------------------------------------------------------


def _axes(spec: AxisSpec, what: str) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    axes = tuple(spec)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{what} must be None, a mesh axis name or a sequence of names, got {spec!r}")
    return axes


def shard_specs(
    qw: QuantizedWeight,
    k_axis: AxisSpec = None,
    n_axis: AxisSpec = None,
    *,
    mesh: Optional[Union[jax.sharding.Mesh, jax.sharding.AbstractMesh]] = None,
) -> QuantizedWeight:
    """PartitionSpecs for the leaves of ``qw``, sharding K over ``k_axis`` and N over ``n_axis``.

    Returns a QuantizedWeight with the same static fields whose leaves are
    ``PartitionSpec``\\ s (``codes: P(k, n, None)``, ``scales: P(k, n)`` or
    ``P(None, n)`` for a single scale row, ``table: P(None)``), ready for::

        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), shard_specs(qw, n_axis="model"))
        qw = jax.device_put(qw, shardings)

    or as ``in_specs`` of ``shard_map``. Stacked weights (leaves with extra
    leading axes, e.g. one per layer) get ``None`` for those axes.

    Args:
      qw: the weight; ``shape = (K, N)``.
      k_axis: mesh axis name(s) for K (row parallel); K must be a multiple of 256 per shard.
      n_axis: mesh axis name(s) for N (column parallel); N must be a multiple of 16 per shard.
      mesh: checks the shard counts; defaults to the mesh set by ``jax.set_mesh``,
        if any. Without one, only the block alignment is checked here and the counts are
        checked when the program is partitioned.
    Raises:
      ValueError if the sharding would split a packed block or a scale group.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a flute_jax.QuantizedWeight, got {type(qw).__name__}")
    k_axes, n_axes = _axes(k_axis, "k_axis"), _axes(n_axis, "n_axis")
    if set(k_axes) & set(n_axes) or len(set(k_axes)) < len(k_axes) or len(set(n_axes)) < len(n_axes):
        raise ValueError(f"each mesh axis may shard only one dimension: k_axis={k_axis!r}, n_axis={n_axis!r}")
    k, n = qw.shape
    if k_axes and k % layout.BLOCK_K:
        raise ValueError(
            f"cannot shard K={k} over {k_axes}: K shards must hold whole {layout.BLOCK_K}-row packed "
            f"blocks, so K must be a multiple of {layout.BLOCK_K}"
        )
    if n_axes and n % layout.BLOCK_N:
        raise ValueError(
            f"cannot shard N={n} over {n_axes}: N shards must hold whole {layout.BLOCK_N}-column "
            f"packed blocks, so N must be a multiple of {layout.BLOCK_N}"
        )
    g = num_groups(k, qw.group_size)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        for a in k_axes + n_axes:
            if a not in mesh.shape:
                raise ValueError(f"mesh axis {a!r} is not in the mesh {dict(mesh.shape)}")
        _check_weight_split(k, n, g, qw.group_rows, _shards(mesh, k_axes), _shards(mesh, n_axes), k_axes, n_axes)
    lead = max(0, qw.codes.ndim - 3)  # stacked weights: leading axes stay unsharded
    k_e, n_e = _spec_entry(k_axes), _spec_entry(n_axes)
    return dataclasses.replace(
        qw,
        codes=PartitionSpec(*([None] * lead), k_e, n_e, None),
        scales=PartitionSpec(*([None] * lead), k_e if g > 1 else None, n_e),
        table=PartitionSpec(*([None] * lead), None),
    )
