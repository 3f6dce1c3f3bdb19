"""Bring existing weights into flute_jax: bitsandbytes 4-bit weights and safetensors checkpoints.

bitsandbytes (QLoRA) 4-bit
--------------------------
A ``bnb`` 4-bit weight of a ``torch.nn.Linear`` with ``shape = (out, in)`` is

* ``packed``: ``uint8[ceil(out*in / 2)]`` (any shape, read flat): the row-major flattened
  ``[out, in]`` codes, two per byte, element ``2i`` in the high nibble, ``2i+1`` in the low;
* ``absmax``: one scale per block of ``blocksize`` consecutive flattened elements:
  ``float32[ceil(out*in / blocksize)]``, or, double-quantized ("compress_statistics",
  ``nested``), ``uint8`` codes of a second, 8-bit blockwise quantization with
  ``nested_absmax float32[ceil(n_blocks / nested_blocksize)]``, ``nested_quant_map
  float32[256]`` and a float ``nested_offset``;
* ``quant_map``: the ``float32[16]`` code values (NF4 for ``quant_type="nf4"``).

bitsandbytes dequantizes (``bitsandbytes.functional.dequantize_4bit``) as::

    absmax = nested_quant_map[absmax_q] * nested_absmax[j // nested_blocksize]   (float32)
    absmax = absmax + nested_offset                                              (float32)
    W[f] = quant_map[code[f]] * absmax[f // blocksize]      (float32, then cast to the output dtype)

Mapping to flute_jax: when ``in % blocksize == 0`` every block lies inside one row
``o`` of ``W`` and covers ``blocksize`` consecutive input features, so block
``o * (in / blocksize) + g`` is scale group ``g`` of output column ``o`` of the Flax kernel
``W.T`` (``[K = in, N = out]``), i.e. ``group_size = blocksize`` along K. (With
``in % blocksize != 0`` blocks straddle rows and no K-grouping reproduces them: rejected.)

Exactness: with ``dtype=float32`` (the default here) scales are bnb's float32 absmax
values, the table is the float32 ``quant_map``, and :func:`flute_jax.dequantize` forms the
same float32 product ``quant_map[c] * absmax`` and casts it like bnb does, so the
dequantized weights are bit-identical to bnb's in every output dtype. With 16-bit
scales the double-dequantized absmax (``code2 * absmax2 + offset``, an arbitrary float32)
and the NF4 values (float32 literals) are generally not representable, so each scale and
table entry is rounded once (relative error <= 2**-8 for bfloat16, 2**-11 for float16, so
<= about 2**-7 / 2**-10 for their product).
Note that ``qgemm`` casts scales and table to the activation dtype, so only float32
activations compute with the exact values.

safetensors
-----------
:class:`SafetensorsFile` parses the format itself (an 8-byte little-endian header length,
a JSON header of ``{name: {dtype, shape, data_offsets}}``, then raw little-endian data)
and reads one tensor at a time from disk, so :func:`quantize_safetensors` holds at most one
float tensor at once next to the quantized result: a checkpoint never needs two full
copies in memory. No dependency on the ``safetensors`` or ``torch`` packages.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import layout, tables
from .quantize import QuantizedWeight, check_activation_dtype, check_group_size, quantize

# ----------------------------------------------------------------------------- bitsandbytes


def _to_numpy(value: Any, what: str) -> np.ndarray:
    """numpy view of a numpy/jax array or a torch tensor (without importing torch)."""
    if value is None:
        raise ValueError(f"{what} is missing")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def bnb_absmax(
    absmax,
    *,
    nested_absmax=None,
    nested_quant_map=None,
    nested_blocksize: int = 256,
    nested_offset: Optional[float] = None,
) -> np.ndarray:
    """bitsandbytes' per-block float32 absmax, undoing double quantization if present.

    Args:
      absmax: ``float32[n_blocks]``, or ``uint8[n_blocks]`` codes when double-quantized.
      nested_absmax: ``float32[ceil(n_blocks / nested_blocksize)]`` (double quantization).
      nested_quant_map: ``float32[256]`` 8-bit code values (bnb's dynamic map).
      nested_blocksize: blocks of absmax codes sharing one nested absmax (bnb uses 256).
      nested_offset: the mean subtracted before the nested quantization.
    Returns:
      ``float32[n_blocks]``, computed with bnb's float32 operations in bnb's order.
    """
    a = _to_numpy(absmax, "absmax").reshape(-1)
    if a.dtype != np.uint8:
        if nested_absmax is not None:
            raise ValueError(f"double-quantized absmax must be uint8 codes, got {a.dtype}")
        if a.dtype != np.float32:
            raise TypeError(f"absmax must be float32 (or uint8 with nested state), got {a.dtype}")
        return a
    if nested_absmax is None or nested_quant_map is None or nested_offset is None:
        raise ValueError("uint8 absmax needs nested_absmax, nested_quant_map and nested_offset (double quantization)")
    code2 = _to_numpy(nested_quant_map, "nested_quant_map").astype(np.float32).reshape(-1)
    absmax2 = _to_numpy(nested_absmax, "nested_absmax").astype(np.float32).reshape(-1)
    if code2.shape != (256,):
        raise ValueError(f"nested_quant_map must have 256 entries, got {code2.shape}")
    nested_blocksize = int(nested_blocksize)
    if nested_blocksize < 1 or absmax2.size != -(-a.size // nested_blocksize):
        raise ValueError(
            f"nested_absmax has {absmax2.size} entries; {a.size} codes in blocks of {nested_blocksize} need "
            f"{-(-a.size // max(nested_blocksize, 1))}"
        )
    offset = np.float32(_to_numpy(nested_offset, "nested_offset"))
    # Same float32 ops as bnb: product (rounded), then + offset (rounded). No fused multiply-add.
    out = code2[a] * np.repeat(absmax2, nested_blocksize)[: a.size]
    return (out + offset).astype(np.float32)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    flat = packed.reshape(-1)
    if flat.dtype != np.uint8:
        flat = flat.view(np.uint8)  # bnb's quant_storage may be another dtype holding the same bytes
    if flat.size * 2 < count:
        raise ValueError(f"packed weight holds {flat.size * 2} codes, the shape needs {count}")
    codes = np.empty(flat.size * 2, np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    return codes[:count]


def from_bnb_4bit(
    packed,
    absmax,
    shape: tuple[int, int],
    *,
    blocksize: int = 64,
    quant_map=None,
    nested_absmax=None,
    nested_quant_map=None,
    nested_blocksize: int = 256,
    nested_offset: Optional[float] = None,
    dtype=jnp.float32,
) -> QuantizedWeight:
    """A bitsandbytes 4-bit ``torch.nn.Linear`` weight -> :class:`QuantizedWeight` of ``W.T``.

    Args:
      packed: bnb's packed weight (``uint8``, any shape, ``ceil(out*in/2)`` bytes).
      absmax: ``float32[n_blocks]``, or ``uint8[n_blocks]`` when double-quantized.
      shape: the torch weight's ``(out, in)``.
      blocksize: bnb block size; must divide ``in`` and be a flute_jax group size (32..256).
      quant_map: the 16 code values; default NF4 (``flute_jax.tables.nf(4)``).
      nested_*: double-quantization state (see :func:`bnb_absmax`).
      dtype: dtype of the stored scales and table. float32 (default) reproduces bnb's
        dequantization bit for bit; 16-bit dtypes round each scale and table entry once.
    Returns:
      A QuantizedWeight of shape ``(in, out)`` with ``bits=4`` and ``group_size=blocksize``.
    """
    dtype = check_activation_dtype(dtype)
    if len(tuple(shape)) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be the torch weight's (out, in), got {shape}")
    out_f, in_f = (int(d) for d in shape)
    blocksize = int(blocksize)
    if blocksize not in (32, 64, 128, 256):
        raise ValueError(f"blocksize {blocksize} has no flute_jax group size (32, 64, 128, 256)")
    if in_f % blocksize:
        raise ValueError(
            f"in features {in_f} is not a multiple of blocksize {blocksize}: bnb blocks then straddle rows "
            "of the [out, in] weight and are not groups along K"
        )
    check_group_size(blocksize)
    table = tables.nf(4).astype(np.float32) if quant_map is None else _to_numpy(quant_map, "quant_map")
    table = np.asarray(table, np.float32).reshape(-1)
    if table.shape != (16,):
        raise ValueError(f"quant_map must have 16 entries, got {table.shape}")
    scales = bnb_absmax(
        absmax,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map,
        nested_blocksize=nested_blocksize,
        nested_offset=nested_offset,
    )
    n_blocks = out_f * in_f // blocksize
    if scales.size != n_blocks:
        raise ValueError(f"absmax has {scales.size} entries, shape {shape} in blocks of {blocksize} needs {n_blocks}")
    codes = _unpack_nibbles(_to_numpy(packed, "packed"), out_f * in_f).reshape(out_f, in_f).T  # [K, N]
    scales = scales.reshape(out_f, in_f // blocksize).T  # [G, N]
    qw = QuantizedWeight(
        codes=layout.pack(jnp.asarray(np.ascontiguousarray(codes)), 4),
        scales=jnp.asarray(scales.astype(dtype)),
        table=jnp.asarray(table.astype(dtype)),
        bits=4,
        group_size=blocksize,
        shape=(in_f, out_f),
    )
    return qw.validate()


def from_bnb_state_dict(tensors: Mapping[str, Any], prefix: str, *, dtype=jnp.float32) -> QuantizedWeight:
    """Convert one serialized bnb 4-bit weight (as in a saved Hugging Face / bnb state dict).

    ``tensors`` maps names to arrays or torch tensors; ``prefix`` is the weight's name, e.g.
    ``"model.layers.0.self_attn.q_proj.weight"``. Reads ``prefix`` (packed codes),
    ``prefix + ".absmax"``, ``".quant_map"``, optionally ``".nested_absmax"``,
    ``".nested_quant_map"``, and the JSON tensor ``".quant_state.bitsandbytes__nf4"`` (or
    ``__fp4``) holding ``shape``, ``blocksize``, ``nested_blocksize``, ``nested_offset``.
    """
    state_keys = [k for k in (f"{prefix}.quant_state.bitsandbytes__nf4", f"{prefix}.quant_state.bitsandbytes__fp4") if k in tensors]
    if len(state_keys) != 1:
        raise ValueError(f"expected one '{prefix}.quant_state.bitsandbytes__nf4/fp4' entry, found {state_keys}")
    meta = json.loads(bytes(_to_numpy(tensors[state_keys[0]], "quant_state").astype(np.uint8)).decode("utf-8"))
    nested = f"{prefix}.nested_absmax" in tensors
    return from_bnb_4bit(
        tensors[prefix],
        tensors[f"{prefix}.absmax"],
        tuple(meta["shape"]),
        blocksize=meta["blocksize"],
        quant_map=tensors.get(f"{prefix}.quant_map"),
        nested_absmax=tensors.get(f"{prefix}.nested_absmax") if nested else None,
        nested_quant_map=tensors.get(f"{prefix}.nested_quant_map") if nested else None,
        nested_blocksize=meta.get("nested_blocksize", 256),
        nested_offset=meta.get("nested_offset") if nested else None,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class SafetensorsFile:
    """Read-one-tensor-at-a-time access to a ``.safetensors`` file.

    ``keys()`` lists tensor names (file order), ``info(name)`` gives ``(dtype, shape)``,
    ``read(name)`` returns a fresh numpy array (only that tensor's bytes are read),
    ``metadata`` the optional ``__metadata__`` dict.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n).decode("utf-8"))
        self._data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = {}
        for name, entry in header.items():
            if entry["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            if end - begin != int(np.prod(shape)) * dtype.itemsize or self._data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} has inconsistent data_offsets {entry['data_offsets']}")
            self._entries[name] = (dtype, shape, begin)
        self._order = sorted(self._entries, key=lambda k: self._entries[k][2])

    def keys(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[np.dtype, tuple]:
        dtype, shape, _ = self._entries[name]
        return dtype, shape

    def read(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin = self._entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
            if out.size and f.readinto(view) != out.nbytes:
                raise ValueError(f"{self.path}: truncated data for tensor {name!r}")
        return out


def _checkpoint_files(path: Union[str, os.PathLike]) -> list[str]:
    """A ``.safetensors`` file, or a directory with one or a sharded ``*.safetensors.index.json``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(os.path.dirname(path), s) for s in shards]
        return [path]
    if os.path.isdir(path):
        index = [p for p in sorted(os.listdir(path)) if p.endswith(".safetensors.index.json")]
        if index:
            return _checkpoint_files(os.path.join(path, index[0]))
        files = [os.path.join(path, p) for p in sorted(os.listdir(path)) if p.endswith(".safetensors")]
        if files:
            return files
    raise ValueError(f"no safetensors checkpoint at {path}")


def iter_safetensors(path: Union[str, os.PathLike]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of a checkpoint, reading one at a time."""
    for file in _checkpoint_files(path):
        st = SafetensorsFile(file)
        for name in st.keys():
            yield name, st.read(name)


LLAMA_LINEAR_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def is_llama_linear(name: str, shape: tuple) -> bool:
    """Default selection: the attention and MLP projections of a Hugging Face Llama."""
    return len(shape) == 2 and name.endswith(LLAMA_LINEAR_SUFFIXES)


def quantize_safetensors(
    path: Union[str, os.PathLike],
    *,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype=jnp.bfloat16,
    select: Callable[[str, tuple], bool] = is_llama_linear,
    keep_dtype=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize a Hugging Face safetensors checkpoint tensor by tensor.

    Args:
      path: a ``.safetensors`` file, a sharded ``*.index.json``, or a directory with either.
      bits, group_size, table, dtype: as in :func:`flute_jax.quantize`.
      select: ``(name, shape) -> bool``: which tensors are Linear weights to quantize
        (default: Llama's q/k/v/o/gate/up/down projections).
      keep_dtype: cast the tensors that are not quantized to this dtype (default: as stored).
      progress: a tqdm bar over tensors.

    Returns:
      ``{name: value}`` with the checkpoint's names: a selected torch Linear weight
      ``[out, in]`` becomes the :class:`QuantizedWeight` of its Flax kernel ``W.T``
      (``shape = (in, out)``); every other tensor a ``jax.Array``. Peak host memory is the
      result plus one float tensor: each tensor is read, converted and released before the
      next is read.
    """
    from tqdm.auto import tqdm

    files = _checkpoint_files(path)
    readers = [SafetensorsFile(f) for f in files]
    names = [(r, n) for r in readers for n in r.keys()]
    out: dict[str, Any] = {}
    for reader, name in tqdm(names, desc="quantize", disable=not progress):
        if name in out:
            raise ValueError(f"tensor {name!r} appears in more than one shard")
        _, shape = reader.info(name)
        if select(name, shape):
            w = reader.read(name)
            is_float = np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16
            if w.ndim != 2 or not is_float:
                raise ValueError(f"selected tensor {name!r} must be a 2-D float weight, got {w.dtype}{list(w.shape)}")
            out[name] = quantize(jnp.asarray(w.T), bits=bits, group_size=group_size, table=table, dtype=dtype)
            del w  # release the float tensor before the next read
        else:
            value = reader.read(name)
            out[name] = jnp.asarray(value if keep_dtype is None else value.astype(keep_dtype))
    return out


__all__ = [
    "LLAMA_LINEAR_SUFFIXES",
    "SafetensorsFile",
    "bnb_absmax",
    "from_bnb_4bit",
    "from_bnb_state_dict",
    "is_llama_linear",
    "iter_safetensors",
    "quantize_safetensors",
]
