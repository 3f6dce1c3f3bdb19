"""Save and restore quantized params with orbax, static metadata included.

A :class:`flute_jax.QuantizedWeight` keeps ``bits``, ``group_size`` and its logical
``shape`` in the pytree structure, not in arrays, and a checkpoint restored without a target
tree comes back as plain nested dicts. So a checkpoint here has two orbax items:

    <directory>/params   the arrays (orbax PyTree/OCDBT format); a QuantizedWeight is saved
                         as the dict {"codes", "scales", "table"}
    <directory>/flute    JSON: format version (the packed codes' layout version) and, per
                         QuantizedWeight path, its bits, group_size and shape

and :func:`restore` rebuilds the QuantizedWeights from both, with no target needed. Given
``shardings`` (one ``jax.sharding.Sharding`` per leaf, in the restored tree's structure, or
one for all), orbax reads each device's shard onto that device, so a model larger than one
device's memory restores directly onto a mesh.

Works for linen param trees (dicts / FrozenDicts, partitioning boxes are dropped on save)
and for ``nnx.State`` (saved as its pure dict; put a restored dict back into a model with
``nnx.replace_by_pure_dict`` or ``nnx.update``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx
from flax.core import meta

from .. import layout
from ..quantize import QuantizedWeight

# The version is the packed codes' layout version (flute_jax.layout.LAYOUT_VERSION).
# Version 1 checkpoints restore too: their 3-bit codes are converted on the way in.
_FORMAT_PREFIX = "flute_jax.quantized_params/"
FORMAT = f"{_FORMAT_PREFIX}{layout.LAYOUT_VERSION}"
_FIELDS = ("codes", "scales", "table")


def _format_version(fmt: Any) -> Optional[int]:
    """The layout version of a checkpoint format string, or None for something else."""
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX) and fmt[len(_FORMAT_PREFIX):].isdigit():
        version = int(fmt[len(_FORMAT_PREFIX):])
        return version if 1 <= version <= layout.LAYOUT_VERSION else None
    return None


def _checkpointer() -> ocp.Checkpointer:
    # Named item handlers, so that metadata() can read the array shapes without a target.
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler(), flute=ocp.JsonCheckpointHandler())
    )


def _unbox(tree: Any) -> Any:
    # .value, not .unbox(): no sharding constraint is wanted while (de)serialising.
    return jax.tree.map(
        lambda x: x.value if isinstance(x, meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, meta.AxisMetadata),
    )


def _state_to_pure_dict(state: "nnx.State") -> dict:
    """``nnx.State`` as a nested dict: ``nnx.to_pure_dict`` where flax has it (the
    ``State.to_pure_dict`` method is deprecated from flax 0.12), else the method."""
    to_pure_dict = getattr(nnx, "to_pure_dict", None)
    return to_pure_dict(state) if to_pure_dict is not None else state.to_pure_dict()


def _to_pure(tree: Any, record: Optional[dict] = None, path: tuple = ()) -> Any:
    """Nested dict with string keys; QuantizedWeights become dicts (recorded in ``record``)."""
    if isinstance(tree, nnx.State):
        tree = _state_to_pure_dict(tree)
    if isinstance(tree, QuantizedWeight):
        if record is not None:
            record["/".join(path)] = {"bits": tree.bits, "group_size": tree.group_size, "shape": list(tree.shape)}
        return {name: getattr(tree, name) for name in _FIELDS}
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {key!r} at {'/'.join(path)}")
            if "/" in str(key):
                raise ValueError(f"checkpoint keys may not contain '/': {key!r}")
            out[str(key)] = _to_pure(value, record, path + (str(key),))
        return out
    return tree


def _from_pure(tree: Any, record: Mapping[str, Mapping], version: int, path: tuple = ()) -> Any:
    key = "/".join(path)
    if key in record:
        info = record[key]
        if not isinstance(tree, Mapping) or set(tree) != set(_FIELDS):
            raise ValueError(f"checkpoint entry {key!r} should hold {_FIELDS}, found {type(tree).__name__}")
        return QuantizedWeight(
            # (moves bits within each unit's words only: the codes keep their sharding)
            codes=layout.upgrade_codes(tree["codes"], int(info["bits"]), version),
            scales=tree["scales"],
            table=tree["table"],
            bits=int(info["bits"]),
            group_size=int(info["group_size"]),
            shape=tuple(int(d) for d in info["shape"]),
        )
    if isinstance(tree, Mapping):
        return {k: _from_pure(v, record, version, path + (k,)) for k, v in tree.items()}
    return tree


def save(directory: str, params: Any, *, force: bool = False) -> None:
    """Write ``params`` (a tree with QuantizedWeights and plain arrays) to ``directory``.

    ``directory`` must not exist unless ``force``. Sharded arrays are written shard by shard
    by the devices that hold them (orbax); the call returns when the checkpoint is complete.
    """
    record: dict = {}
    pure = _to_pure(_unbox(params), record)
    if not isinstance(pure, Mapping):
        raise TypeError(f"params must be a mapping or nnx.State, got {type(params).__name__}")
    directory = os.path.abspath(directory)
    with _checkpointer() as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(pure),
                flute=ocp.args.JsonSave({"format": FORMAT, "quantized": record}),
            ),
            force=force,
        )


def metadata(directory: str) -> dict:
    """The checkpoint's static metadata: ``{"format": ..., "quantized": {path: {...}}}``."""
    directory = os.path.abspath(directory)
    with _checkpointer() as checkpointer:
        info = checkpointer.restore(directory, args=ocp.args.Composite(flute=ocp.args.JsonRestore()))["flute"]
    if _format_version(info.get("format")) is None:
        raise ValueError(
            f"{directory} is not a flute_jax checkpoint this version reads (format {info.get('format')!r}; "
            f"reads {_FORMAT_PREFIX}1 to {FORMAT})"
        )
    return info


def _array_metadata(directory: str) -> Any:
    with _checkpointer() as checkpointer:
        tree = checkpointer.metadata(directory)
    tree = tree.item_metadata["params"]
    return tree.tree if hasattr(tree, "tree") else tree


def restore(directory: str, *, shardings: Any = None) -> dict:
    """Read a checkpoint written by :func:`save`; QuantizedWeights come back whole.

    Args:
      directory: the checkpoint directory.
      shardings: where to put the arrays. None: all on the default device. One
        ``jax.sharding.Sharding``: every array (e.g. replicated over a mesh). A pytree in the
        structure of the restored params (QuantizedWeight nodes with one sharding per leaf,
        e.g. ``nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)``),
        or an ``nnx.State`` of shardings: each array is read shard by shard onto its devices.
    Returns:
      Nested dicts with string keys and QuantizedWeight leaves where they were saved.
    """
    directory = os.path.abspath(directory)
    info = metadata(directory)
    record, version = info["quantized"], _format_version(info["format"])
    shapes = _array_metadata(directory)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        pure_shardings = jax.tree.map(lambda _: shardings, shapes)
    else:
        pure_shardings = _to_pure(
            _unbox(_state_to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings)
        )

    try:
        abstract = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s),
            shapes,
            pure_shardings,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )
    except ValueError as err:  # structures differ
        raise ValueError(f"shardings do not match the checkpoint's params tree: {err}") from None
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            directory, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        )["params"]
    return _from_pure(restored, record, version)
