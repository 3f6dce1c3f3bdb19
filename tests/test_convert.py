"""Importing bitsandbytes 4-bit weights and streaming safetensors checkpoints (flute_jax.convert)."""

import json
import struct
import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import flute_jax as fj
from flute_jax.convert import (
    SafetensorsFile,
    bnb_absmax,
    from_bnb_4bit,
    from_bnb_state_dict,
    iter_safetensors,
    quantize_safetensors,
)

NF4 = fj.tables.nf(4).astype(np.float32)


# ----------------------------------------------------------------------------- bnb, without bnb


def fake_bnb_nf4(rng, out_f, in_f, blocksize, nested):
    """A bnb-format NF4 weight built by hand, with bnb's documented dequantization as reference.

    Reference (float32, bnb's order): absmax = code2[q] * absmax2[j // 256] + offset;
    W[f] = NF4[code[f]] * absmax[f // blocksize], flattened row-major over [out, in].
    """
    n = out_f * in_f
    codes = rng.integers(0, 16, n).astype(np.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8).reshape(-1, 1)
    n_blocks = n // blocksize
    absmax = rng.uniform(0.01, 3.0, n_blocks).astype(np.float32)
    state = {}
    if nested:
        code2 = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
        absmax2 = rng.uniform(0.5, 2.0, -(-n_blocks // 256)).astype(np.float32)
        q = rng.integers(0, 256, n_blocks).astype(np.uint8)
        offset = np.float32(rng.uniform(0.5, 1.5))
        absmax = np.array(
            [np.float32(np.float32(code2[q[j]] * absmax2[j // 256]) + offset) for j in range(n_blocks)], np.float32
        )
        state = dict(nested_absmax=absmax2, nested_quant_map=code2, nested_offset=float(offset))
        stored_absmax = q
    else:
        stored_absmax = absmax
    ref = np.array([np.float32(NF4[codes[f]] * absmax[f // blocksize]) for f in range(n)], np.float32)
    return packed, stored_absmax, state, ref.reshape(out_f, in_f)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_f,in_f,blocksize", [(24, 128, 64), (7, 320, 64), (300, 64, 32), (5, 512, 256)])
def test_from_bnb_matches_documented_dequantization(rng, nested, out_f, in_f, blocksize):
    packed, absmax, state, ref = fake_bnb_nf4(rng, out_f, in_f, blocksize, nested)
    qw = from_bnb_4bit(packed, absmax, (out_f, in_f), blocksize=blocksize, **state)
    assert (qw.shape, qw.group_size, qw.bits, qw.dtype) == ((in_f, out_f), blocksize, 4, jnp.float32)
    np.testing.assert_array_equal(np.asarray(fj.dequantize(qw)), ref.T)  # bit-exact
    for dt in (jnp.bfloat16, jnp.float16):  # casting the same float32 product, as bnb does
        np.testing.assert_array_equal(np.asarray(fj.dequantize(qw, dt)), ref.T.astype(dt))


def test_from_bnb_16bit_scales_round_once(rng):
    packed, absmax, state, ref = fake_bnb_nf4(rng, 16, 256, 64, True)
    for dt, u in ((jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)):  # unit roundoff
        bound = (1 + u) ** 2 - 1
        qw = from_bnb_4bit(packed, absmax, (16, 256), **state, dtype=dt)
        got = np.asarray(fj.dequantize(qw, jnp.float32), np.float64)
        want = ref.T.astype(np.float64)
        # One rounding of the scale and one of the table entry: |rel err| <= (1+u)^2 - 1.
        assert np.all(np.abs(got - want) <= bound * np.abs(want) + 1e-30)
        assert not np.array_equal(got, want)  # and not exact: that needs float32 scales


def test_bnb_absmax_and_bad_inputs(rng):
    a = rng.uniform(0, 1, 10).astype(np.float32)
    np.testing.assert_array_equal(bnb_absmax(a), a)
    with pytest.raises(ValueError, match="nested"):
        bnb_absmax(a.astype(np.uint8))
    with pytest.raises(TypeError, match="float32"):
        bnb_absmax(a.astype(np.float64))
    packed, absmax, state, _ = fake_bnb_nf4(rng, 4, 128, 64, False)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        from_bnb_4bit(packed, absmax[:6], (6, 96), blocksize=64)
    with pytest.raises(ValueError, match="group size"):
        from_bnb_4bit(packed, absmax, (4, 128), blocksize=512)
    with pytest.raises(ValueError, match="absmax has"):
        from_bnb_4bit(packed, absmax[:-1], (4, 128))
    with pytest.raises(ValueError, match="packed weight holds"):
        from_bnb_4bit(packed[:-1], absmax, (4, 128))


# ----------------------------------------------------------------------------- bnb itself


def test_from_bnb_matches_bitsandbytes_exactly(rng):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(int(rng.integers(2**31)))
    for nested in (False, True):
        for out_f, in_f, bs in ((40, 192, 64), (33, 256, 128), (64, 96, 32)):
            for odt, jdt in ((torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16), (torch.float16, jnp.float16)):
                w = torch.randn(out_f, in_f, dtype=odt) * float(rng.uniform(0.01, 3))
                packed, st = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=nested)
                want = F.dequantize_4bit(packed, st).float().numpy().T  # bnb's own dequantization, [in, out]
                qw = from_bnb_4bit(
                    packed,
                    st.absmax,
                    tuple(st.shape),
                    blocksize=st.blocksize,
                    quant_map=st.code,
                    nested_absmax=st.state2.absmax if nested else None,
                    nested_quant_map=st.state2.code if nested else None,
                    nested_blocksize=st.state2.blocksize if nested else 256,
                    nested_offset=st.offset if nested else None,
                )
                got = np.asarray(fj.dequantize(qw, jdt).astype(jnp.float32))
                np.testing.assert_array_equal(got, want)
                # The serialized (safetensors / HF state dict) form converts to the same weight.
                sd = {"m.weight": packed, **{f"m.weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
                got_sd = np.asarray(fj.dequantize(from_bnb_state_dict(sd, "m.weight"), jdt).astype(jnp.float32))
                np.testing.assert_array_equal(got_sd, want)


# ----------------------------------------------------------------------------- safetensors

_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype("<i8"): "I64"}


def write_safetensors(path, tensors, metadata=None):
    """Minimal writer of the documented format (8-byte header length, JSON header, data)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.tobytes())
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def tiny_llama(rng, layers=2, hidden=256, inter=512, vocab=64):
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(ml_dtypes.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden // 4, hidden)),
            ("self_attn.v_proj", (hidden // 4, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ):
            t[p + name + ".weight"] = (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)
        t[p + "input_layernorm.weight"] = np.ones(hidden, ml_dtypes.bfloat16)
    t["model.norm.weight"] = np.ones(hidden, ml_dtypes.bfloat16)
    return t


def test_safetensors_reader_roundtrip(rng, tmp_path):
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "c": rng.integers(-5, 5, (2, 2, 2)).astype(np.int64),
        "d": rng.standard_normal((0, 4)).astype(np.float16),
    }
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    st = SafetensorsFile(tmp_path / "m.safetensors")
    assert st.keys() == ["a", "b", "c", "d"] and st.metadata == {"format": "pt"}
    for name, arr in tensors.items():
        got = st.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got.view(np.uint8), arr.view(np.uint8))
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_quantize_llama_checkpoint_tensor_by_tensor(rng, tmp_path):
    tensors = tiny_llama(rng)
    # Two shards with an index, as Hugging Face writes large checkpoints.
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:8], "model-00002-of-00002.safetensors": names[8:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [n for n, _ in iter_safetensors(tmp_path)] == names

    float_bytes = sum(a.nbytes for a in tensors.values())
    largest = max(a.nbytes for a in tensors.values())
    quantize_safetensors(tmp_path, bits=4, group_size=64, dtype=jnp.bfloat16, progress=False)  # compile first
    tracemalloc.start()
    out = quantize_safetensors(tmp_path, bits=4, group_size=64, dtype=jnp.bfloat16, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Host (numpy) memory holds about one tensor at a time, far below one full float copy.
    assert peak < 3 * largest + (1 << 20) < float_bytes

    assert list(out) == names
    for name, arr in tensors.items():
        if name.endswith("_proj.weight"):
            qw = out[name]
            assert isinstance(qw, fj.QuantizedWeight) and qw.shape == arr.T.shape
            want = fj.quantize(jnp.asarray(arr.T), bits=4, group_size=64, dtype=jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(qw.codes), np.asarray(want.codes))
            np.testing.assert_array_equal(np.asarray(qw.scales), np.asarray(want.scales))
        else:
            np.testing.assert_array_equal(np.asarray(out[name]), arr)
    with pytest.raises(ValueError, match="no safetensors"):
        quantize_safetensors(tmp_path / "missing", progress=False)
