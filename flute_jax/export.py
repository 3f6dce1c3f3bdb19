"""Serializing programs that call qgemm with ``jax.export``.

``jax.export`` refuses custom calls it does not know to be stable unless told
otherwise. flute_jax's FFI targets keep their operands, attributes and results
stable within a release, so an exported function may call them::

    exp = jax.export.export(jax.jit(f), disabled_checks=flute_jax.export_disabled_checks())(*args)
    blob = exp.serialize()
    y = jax.export.deserialize(blob).call(*args)   # needs flute_jax imported (targets registered)

QuantizedWeight arguments and results serialize with the exported function's
pytree structure (registered below, under ``flute_jax.QuantizedWeight``).

Sharded programs export through ``shard_map`` (the kernel call is then local
to each device). A ``jax.jit`` program partitioned by the custom partitioning
rules contains a partitioner callback that lives in the exporting process
only, and cannot be serialized.
"""

from __future__ import annotations

import dataclasses
import json

import jax

from . import _ffi
from .quantize import QuantizedWeight


def export_disabled_checks() -> list:
    """``jax.export.DisabledSafetyCheck``\\ s allowing flute_jax's FFI custom calls."""
    names = set(_ffi._flute_ffi.cpu_targets()) | set(_ffi._flute_ffi.cuda_targets()) | {_ffi.QGEMM_TARGET}
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in sorted(names)]


# register_dataclass flattens to (array fields, static fields), both in declaration order.
_STATIC = [f.name for f in dataclasses.fields(QuantizedWeight) if f.metadata.get("static")]
_ARRAYS = [f.name for f in dataclasses.fields(QuantizedWeight) if not f.metadata.get("static")]


def _serialize_aux(aux) -> bytes:
    return json.dumps(dict(zip(_STATIC, aux))).encode()


def _deserialize_aux(data: bytes):
    d = json.loads(data.decode())
    # JSON has no tuples; the static fields hold ints and tuples of ints.
    return tuple(tuple(d[k]) if isinstance(d[k], list) else d[k] for k in _STATIC)


def _from_children(aux, children):
    return QuantizedWeight(**dict(zip(_ARRAYS, children)), **dict(zip(_STATIC, aux)))


jax.export.register_pytree_node_serialization(
    QuantizedWeight,
    serialized_name="flute_jax.QuantizedWeight",
    serialize_auxdata=_serialize_aux,
    deserialize_auxdata=_deserialize_aux,
    from_children=_from_children,
)
