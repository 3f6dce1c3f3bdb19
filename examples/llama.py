"""A Llama-3-style decoder in Flax, quantized with flute_jax.

    python examples/llama.py                         # tiny random model: quantize, generate, compare
    python examples/llama.py --hf /path/to/Llama-3.2-1B --prompt-ids 128000,791,6864
    python examples/llama.py --config 8b --bench     # decode tokens/s, bf16 vs FLUTE (GPU)

``--bench`` variants: bf16, 4bit-g64, 4bit-g128, 3bit-g64 (lm head bf16) and 4bit-g128-head
(the lm head quantized too, 4-bit g128), at each of ``--bench-batches`` with the KV cache
filled to ``--context``.

Model: RMSNorm, rotary embeddings (Hugging Face's rotate-half convention, with Llama 3.1
frequency scaling when the config has it), grouped-query attention with an explicit KV
cache, SwiGLU MLP, tied or untied output head. q/k/v run as one fused projection ``qkv``
(features [kv_heads, group + 2, head_dim]: each KV head's query heads, key, value) and
gate/up as one ``gate_up`` (features [hidden / 8, 2, 8]: gate and up interleaved in blocks of
8), as serving stacks do: in decode every projection is one memory-bound call, and small calls
cost their fixed latency. The quantized gate_up kernel also applies silu(gate) * up to its own
float32 sums (``--mlp fused``, qgemm's ``epilogue="swiglu"``). A contiguous tensor-parallel split of the features then gives each device whole
KV-head groups (when the degree divides kv_heads) and matching gate/up pairs. Every projection is ``nn.Dense`` (bf16) or,
with ``quant`` set, ``flute_jax.nn.FluteDense`` under the same name, so the bf16 params
convert with one ``flute_jax.nn.quantize_params`` call. The lm head stays bf16 unless
``--quantize-head``. A decode step's attention layer (rotary embedding, cache update,
attention) runs as two Pallas kernels on NVIDIA GPUs (decode_attention.py; ``--attention
auto``), else by XLA's ops (``--attention xla``; ``cudnn`` puts cuDNN's kernel on the
attention itself), in every variant, and each residual add with the RMSNorm after it as one
Pallas kernel (residual_norm.py; ``--norm auto``, or ``xla``). Kernels carry logical axis names (embed, heads, mlp, vocab) that tp_inference.py
maps onto a device mesh.

Weights: random (``--config tiny|8b|70b``) or a Hugging Face Llama safetensors checkpoint
directory (``--hf``: config.json and *.safetensors), read with numpy (no extra package).
There is no tokenizer here: prompts are token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import struct
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import flute_jax
from flute_jax import nn as fnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:  # Pallas' Triton backend, deprecated since JAX 0.11 (Mosaic GPU replaces it): without it, XLA's path
    from decode_attention import decode_step_attention  # noqa: E402
    import residual_norm  # noqa: E402
except ImportError:
    decode_step_attention = residual_norm = None


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[tuple] = None  # (factor, low_freq_factor, high_freq_factor, original_max_pos)
    tie_embeddings: bool = False


CONFIGS = {
    # small enough for a CPU test in seconds; K of every row-parallel layer splits 4 ways
    # into whole 256-row blocks (tp_inference.py), N of every layer into 16-column blocks
    "tiny": Config(vocab=512, dim=512, layers=2, heads=8, kv_heads=4, hidden=1024, head_dim=128),
    "tiny-tied": Config(vocab=512, dim=512, layers=2, heads=8, kv_heads=4, hidden=1024, head_dim=128, tie_embeddings=True),
    "8b": Config(vocab=128256, dim=4096, layers=32, heads=32, kv_heads=8, hidden=14336, head_dim=128,
                 rope_scaling=(8.0, 1.0, 4.0, 8192)),
    "70b": Config(vocab=128256, dim=8192, layers=80, heads=64, kv_heads=8, hidden=28672, head_dim=128,
                  rope_scaling=(8.0, 1.0, 4.0, 8192)),
}


# ----------------------------------------------------------------------------- model
def rope_frequencies(cfg: Config) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (float64), with Llama 3.1 scaling if configured."""
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    if cfg.rope_scaling is None:
        return freqs
    factor, low, high, original = cfg.rope_scaling
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    # long wavelengths (smooth 0) are divided by factor, short ones (smooth 1) kept
    return (1 - smooth) * freqs / factor + smooth * freqs


def apply_rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """x [B, T, heads, D], positions [T] -> rotated x (rotate-half convention)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# How RMSNorm and the residual add before it run:
#   auto    one Pallas kernel (residual_norm.py) where the program is compiled for an NVIDIA GPU
#           and the kernel fits (float16/bfloat16 activations, a power-of-two model width; under
#           a mesh, per device in a shard_map over the batch axis, when the embed axis is not
#           sharded), else XLA's ops;
#   pallas  the same kernel, run in Pallas' interpreter off the GPU (slow: for tests);
#   xla     XLA's ops.
NORM = ("auto", "pallas", "xla")

# How a quantized model's MLP gate runs (the bf16 model always runs it after its dot):
#   fused    in gate_up's FLUTE kernel (qgemm's epilogue="swiglu"): one kernel returns silu(gate) * up
#   unfused  gate_up's kernel returns [.., 2 hidden]; silu(gate) * up is XLA's fusion after it
MLP = ("fused", "unfused")


def _rms_norm_by_xla(x, delta, scale, eps):
    total = x if delta is None else x + delta
    xf = total.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return total, scale * normed.astype(scale.dtype)


def _norm_mesh_spec(batch: int):
    """The active mesh's batch axis under flax's logical axis rules; None without a mesh;
    False where the embed axis is sharded (the norm reduces over it) or the batch axis does
    not divide ``batch``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch_axes, embed_axes = nn.logical_to_mesh_axes(("batch", "embed"))
    if embed_axes is not None:
        return False
    names = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return False if batch % math.prod(mesh.shape[a] for a in names) else batch_axes


def _rms_norm_by_pallas(x, delta, scale, eps, interpret=False):
    """residual_rms_norm by residual_norm.py's kernel; under a mesh per device (the batch axis
    split, the rows whole on every device)."""
    def run(x, *delta_and_scale):
        *delta, scale = delta_and_scale
        return residual_norm.add_rms_norm(x, delta[0] if delta else None, scale, eps, interpret=interpret)

    args = (x, scale) if delta is None else (x, delta, scale)
    spec = _norm_mesh_spec(x.shape[0])
    if spec is None:
        return run(*args)
    rows = P(spec)
    return jax.shard_map(run, in_specs=(rows,) * (len(args) - 1) + (P(),), out_specs=(rows, rows),
                         check_vma=False)(*args)


def residual_rms_norm(x: jax.Array, delta: Optional[jax.Array], scale: jax.Array, eps: float,
                      how: str = "auto") -> tuple[jax.Array, jax.Array]:
    """The residual stream x [..., D] plus a sublayer's output delta [..., D] (None: nothing
    to add), and its RMSNorm times scale [D], by ``how`` (NORM). Returns (x + delta, normed),
    both in x's dtype."""
    if how not in NORM:
        raise ValueError(f"norm must be one of {NORM}, got {how!r}")
    fits = (residual_norm is not None and residual_norm.fits(x, scale) and scale.dtype == x.dtype
            and (delta is None or delta.dtype == x.dtype) and _norm_mesh_spec(x.shape[0]) is not False)
    by_xla = functools.partial(_rms_norm_by_xla, eps=eps)
    by_pallas = functools.partial(_rms_norm_by_pallas, eps=eps)
    if how == "xla" or (how == "auto" and not fits):
        return by_xla(x, delta, scale)
    if how == "pallas" and not fits:
        raise ValueError(f"the Pallas norm does not take x {x.shape} {x.dtype} with scale {scale.dtype} here")
    # (platform_dependent passes arrays only: without delta, the branches take (x, scale))
    args = (x, scale) if delta is None else (x, delta, scale)
    unpack = lambda fn, **kw: lambda *a: fn(a[0], a[1] if len(a) == 3 else None, a[-1], **kw)  # noqa: E731
    default = unpack(by_pallas, interpret=True) if how == "pallas" else unpack(by_xla)
    return jax.lax.platform_dependent(*args, cuda=unpack(by_pallas), default=default)


class RMSNorm(nn.Module):
    """RMSNorm of the residual stream after a sublayer's output is added to it:
    ``(x, delta) -> (x + delta, RMSNorm(x + delta) * scale)`` (delta None: nothing added)."""
    eps: float
    dtype: Any = jnp.bfloat16
    how: str = "auto"  # see NORM

    @nn.compact
    def __call__(self, x, delta=None):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.dtype)
        return residual_rms_norm(x, delta, scale, self.eps, self.how)


def make_dense(features: int, name: str, axes: tuple, quant: Optional[dict], dtype, epilogue: Optional[str] = None):
    """A Dense, or with ``quant`` a FluteDense, of ``features`` outputs; ``epilogue`` (flute_jax.epilogue)
    is fused into the FluteDense's kernel (quantized layers only)."""
    # fan-in scaled, so that every random layer moves the residual stream as much as a trained one
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    if quant is None:
        if epilogue is not None:
            raise ValueError("an epilogue is fused into quantized layers only")
        return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init, name=name)
    return fnn.FluteDense(features, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init, name=name,
                          epilogue=epilogue, **quant)


def constrain(x, axes):
    """Logical sharding constraint on activations (a no-op without axis rules / mesh)."""
    return nn.with_logical_constraint(x, axes)


def attention_xla(query: jax.Array, cache_k: jax.Array, cache_v: jax.Array, pos: jax.Array) -> jax.Array:
    """Grouped-query attention over the cache by XLA's dots and softmax.

    query [B, T, heads, D] at positions pos .. pos + T - 1; cache_k, cache_v [B, S, kv_heads, D]
    (filled up to pos + T - 1) -> [B, T, heads, D] in query's dtype. Query head h reads KV head
    h // (heads // kv_heads). Scores and softmax in float32, probabilities in query's dtype.
    """
    b, t, heads, d = query.shape
    kv_heads = cache_k.shape[2]
    qg = query.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(d)
    positions = pos + jnp.arange(t)
    visible = jnp.arange(cache_k.shape[1])[None, :] <= positions[:, None]  # [T, S] causal + filled
    scores = jnp.where(visible[None, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, cache_v).reshape(b, t, heads, d)


def attention_cudnn(query: jax.Array, cache_k: jax.Array, cache_v: jax.Array, pos: jax.Array) -> jax.Array:
    """One decode step (T = 1) of the same attention by cuDNN's fused kernel (NVIDIA GPUs,
    float16/bfloat16): one kernel instead of XLA's two dots and the softmax's fusions. The
    keys past pos are masked by a key length of pos + 1 per sequence. Raises at trace time
    where cuDNN can't run it (no cuDNN, an unsupported GPU, dtype or head size)."""
    b, t = query.shape[:2]
    if t != 1:
        raise NotImplementedError("cuDNN attention here covers decode steps (T = 1) only")
    lengths = jnp.full((b,), pos + 1, jnp.int32)
    return jax.nn.dot_product_attention(query, cache_k, cache_v, key_value_seq_lengths=lengths,
                                        implementation="cudnn")


def attend(query: jax.Array, cache_k: jax.Array, cache_v: jax.Array, pos: jax.Array, how: str = "xla") -> jax.Array:
    """Attention over an updated cache by ``how``: "xla", or "cudnn" (decode steps, T = 1, on
    cuDNN's kernel where the step is compiled for an NVIDIA GPU and cuDNN takes it, else XLA).
    Prompts (T > 1) always take XLA's path. Shapes as in :func:`attention_xla`."""
    if how not in ("xla", "cudnn"):
        raise ValueError(f"how must be 'xla' or 'cudnn', got {how!r}")
    if query.shape[1] == 1 and how == "cudnn" and query.dtype in (jnp.bfloat16, jnp.float16):
        try:
            # Chosen where the program is lowered, not by the default backend: a GPU machine
            # may compile this step for its CPU devices (e.g. a CPU mesh), where cuDNN isn't.
            return jax.lax.platform_dependent(query, cache_k, cache_v, pos, cuda=attention_cudnn,
                                              default=attention_xla)
        except (NotImplementedError, RuntimeError):
            pass  # tracing cuDNN's path failed: no cuDNN, or a GPU or head size it doesn't cover
    return attention_xla(query, cache_k, cache_v, pos)


# How a decode step (T = 1) runs its attention layer (rotary embedding, cache update,
# attention); prompts always take XLA's path:
#   auto    the Pallas kernels of decode_attention.py where the step is compiled for an NVIDIA
#           GPU, else XLA's path. Under a mesh (jax.set_mesh, with flax's logical axis rules)
#           the kernels run per device in a shard_map over the batch and KV-head axes;
#   pallas  the same kernels, compiled for NVIDIA GPUs and run in Pallas' interpreter elsewhere
#           (slow: for tests);
#   cudnn   XLA's rotary embedding and cache updates, then cuDNN's attention kernel where the
#           step is compiled for an NVIDIA GPU, else XLA's (XLA partitions it over heads);
#   xla     XLA's ops throughout.
ATTENTION = ("auto", "pallas", "cudnn", "xla")


def _attention_by_xla(qkv, cache_k, cache_v, pos, freqs, how="xla"):
    """attention_layer by XLA's ops, with attend(..., how) for the attention itself."""
    b, t, kv_heads, group2, head_dim = qkv.shape
    query = qkv[:, :, :, : group2 - 2].reshape(b, t, kv_heads * (group2 - 2), head_dim)
    key, value = qkv[:, :, :, group2 - 2], qkv[:, :, :, group2 - 1]
    positions = pos + jnp.arange(t)
    query, key = apply_rope(query, positions, freqs), apply_rope(key, positions, freqs)
    cache_k = jax.lax.dynamic_update_slice(cache_k, key.astype(cache_k.dtype), (0, pos, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, value.astype(cache_v.dtype), (0, pos, 0, 0))
    return attend(query, cache_k, cache_v, pos, how), cache_k, cache_v


def _pallas_mesh_spec(batch: int, kv_heads: int):
    """The active mesh's (batch, KV-head) axes under flax's logical axis rules, as a
    PartitionSpec; None without a mesh; False where they don't divide batch and KV heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = nn.logical_to_mesh_axes(("batch", "kv_heads"))
    for axes, size in zip(spec, (batch, kv_heads)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if size % math.prod(mesh.shape[a] for a in names):
            return False
    return spec


def _attention_by_pallas(qkv, cache_k, cache_v, pos, freqs, interpret=False):
    """attention_layer of a decode step (T = 1) by the Pallas kernels of decode_attention.py;
    under a mesh, per device (shard_map over the batch and KV-head axes: each KV head's
    query heads, key, value and cache rows live on one device, so no device needs another's)."""
    angles = pos.astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)  # as apply_rope computes them
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    def run(qkv, cache_k, cache_v, pos, cos, sin):
        return decode_step_attention(qkv[:, 0], cache_k, cache_v, pos, cos, sin, interpret=interpret)

    spec = _pallas_mesh_spec(qkv.shape[0], qkv.shape[2])
    if spec is None:
        return run(qkv, cache_k, cache_v, pos, cos, sin)
    if spec is False:
        raise ValueError(f"the mesh's batch / KV-head axes must divide batch {qkv.shape[0]} and {qkv.shape[2]} KV heads")
    batch_axis, head_axis = spec
    per_head = P(batch_axis, None, head_axis, None)  # caches [B, S, kv_heads, D] and the output [B, 1, heads, D]
    return jax.shard_map(run, in_specs=(P(batch_axis, None, head_axis, None, None), per_head, per_head, P(), P(), P()),
                         out_specs=(per_head, per_head, per_head),
                         check_vma=False)(qkv, cache_k, cache_v, pos, cos, sin)


def attention_layer(qkv: jax.Array, cache_k: jax.Array, cache_v: jax.Array, pos: jax.Array, freqs: np.ndarray,
                    how: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotary embedding, KV cache update and attention of one layer, by ``how`` (ATTENTION).

    qkv [B, T, kv_heads, group + 2, D]: the fused projection's output at positions
    pos .. pos + T - 1 (per KV head its query heads, key, value; before the rotary
    embedding); cache_k, cache_v [B, S, kv_heads, D] filled up to pos - 1; freqs [D / 2]
    (:func:`rope_frequencies`). Returns (attention output [B, T, heads, D] in qkv's dtype,
    cache_k, cache_v with rows pos .. pos + T - 1 set).
    """
    if how not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {how!r}")
    pos = jnp.asarray(pos, jnp.int32)
    decode = qkv.shape[1] == 1 and qkv.dtype in (jnp.bfloat16, jnp.float16)
    by_xla = functools.partial(_attention_by_xla, freqs=freqs)
    if decode and how == "pallas":
        if decode_step_attention is None:
            raise NotImplementedError("this JAX has no Pallas Triton backend (jax.experimental.pallas.triton)")
        return jax.lax.platform_dependent(qkv, cache_k, cache_v, pos,
                                          cuda=functools.partial(_attention_by_pallas, freqs=freqs),
                                          default=functools.partial(_attention_by_pallas, freqs=freqs, interpret=True))
    head_dim = qkv.shape[-1]
    pallas_fits = (decode_step_attention is not None and cache_k.dtype == cache_v.dtype == qkv.dtype
                   and head_dim >= 32 and not head_dim & (head_dim - 1)
                   and _pallas_mesh_spec(qkv.shape[0], qkv.shape[2]) is not False)
    if decode and how == "auto" and pallas_fits:
        return jax.lax.platform_dependent(qkv, cache_k, cache_v, pos,
                                          cuda=functools.partial(_attention_by_pallas, freqs=freqs), default=by_xla)
    # (auto where the Pallas kernels don't fit takes cuDNN's kernel on NVIDIA GPUs; prompts take XLA's path either way)
    return by_xla(qkv, cache_k, cache_v, pos, how="xla" if how in ("xla", "pallas") else "cudnn")


class Block(nn.Module):
    cfg: Config
    quant: Optional[dict] = None
    dtype: Any = jnp.bfloat16
    attention: str = "auto"  # see ATTENTION
    norm: str = "auto"  # see NORM
    mlp: str = "fused"  # see MLP

    @nn.compact
    def __call__(self, x, cache, pos, delta=None):
        """x [B, T, dim]: the residual stream; delta [B, T, dim] or None: the block before's
        output, still to be added to x (the add runs in this block's first norm); cache (k, v)
        each [B, S, kv_heads, head_dim]; pos: int32 scalar. Returns (x, delta, cache): the
        stream before this block's MLP output, that output (still to be added), the cache."""
        cfg, q = self.cfg, self.quant
        b, t, _ = x.shape
        x, h = RMSNorm(cfg.norm_eps, self.dtype, self.norm, name="attn_norm")(x, delta)
        group = cfg.heads // cfg.kv_heads
        # One fused q/k/v projection (one qgemm call instead of three). Its features are
        # [kv_heads, group + 2, head_dim]: each KV head's `group` query heads, then its key
        # and value heads, so a contiguous split of the features over devices gives every
        # device whole KV-head groups (tensor parallelism over heads).
        qkv = make_dense(cfg.kv_heads * (group + 2) * cfg.head_dim, "qkv", ("embed", "heads"), q, self.dtype)(h)
        qkv = qkv.reshape(b, t, cfg.kv_heads, group + 2, cfg.head_dim)
        attn, cache_k, cache_v = attention_layer(qkv, cache[0], cache[1], pos, rope_frequencies(cfg), self.attention)
        cache_k = constrain(cache_k, ("batch", None, "kv_heads", None))
        cache_v = constrain(cache_v, ("batch", None, "kv_heads", None))
        attn = attn.reshape(b, t, cfg.heads * cfg.head_dim)
        out = make_dense(cfg.dim, "o", ("heads", "embed"), q, self.dtype)(attn)
        x, h = RMSNorm(cfg.norm_eps, self.dtype, self.norm, name="mlp_norm")(x, out)
        # One fused gate/up projection, features [hidden / 8, 2, 8]: 8 gate units, then the same
        # 8 up units (flute_jax.epilogue.interleave_gate_up), so a split over devices in whole
        # 16-feature blocks keeps each pair together, and a FLUTE kernel applies silu(gate) * up
        # to its own accumulators (epilogue "swiglu").
        if self.mlp not in MLP:
            raise ValueError(f"mlp must be one of {MLP}, got {self.mlp!r}")
        if q is not None and self.mlp == "fused":
            mid = make_dense(2 * cfg.hidden, "gate_up", ("embed", "mlp"), q, self.dtype, epilogue="swiglu")(h)
        else:
            gate_up = make_dense(2 * cfg.hidden, "gate_up", ("embed", "mlp"), q, self.dtype)(h)
            mid = flute_jax.epilogue.apply(gate_up, "swiglu")
        mid = constrain(mid, ("batch", None, "mlp"))
        out = make_dense(cfg.dim, "down", ("mlp", "embed"), q, self.dtype)(mid)
        axes = ("batch", None, "embed")
        return constrain(x, axes), constrain(out, axes), (cache_k, cache_v)


class Llama(nn.Module):
    cfg: Config
    quant: Optional[dict] = None  # FluteDense fields: bits, group_size, table
    quantize_head: bool = False
    dtype: Any = jnp.bfloat16
    attention: str = "auto"  # see ATTENTION
    norm: str = "auto"  # see NORM
    mlp: str = "fused"  # see MLP

    @nn.compact
    def __call__(self, tokens, cache, pos):
        """tokens int32 [B, T] at positions pos.. pos+T-1 -> (logits float32 [B, T, vocab], cache)."""
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab, cfg.dim, dtype=self.dtype, param_dtype=self.dtype, name="embed",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
        x = constrain(embed(tokens), ("batch", None, "embed"))
        new_cache, delta = [], None
        for i in range(cfg.layers):
            x, delta, layer_cache = Block(cfg, self.quant, self.dtype, self.attention, self.norm, self.mlp,
                                          name=f"layers_{i}")(x, cache[i], pos, delta)
            new_cache.append(layer_cache)
        _, x = RMSNorm(cfg.norm_eps, self.dtype, self.norm, name="norm")(x, delta)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            head_quant = self.quant if self.quantize_head else None
            logits = make_dense(cfg.vocab, "lm_head", ("embed", "vocab"), head_quant, self.dtype)(x)
        return logits.astype(jnp.float32), tuple(new_cache)


def init_cache(cfg: Config, batch: int, length: int, dtype=jnp.bfloat16) -> tuple:
    shape = (batch, length, cfg.kv_heads, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.layers))


def random_params(cfg: Config, seed: int = 0, dtype=jnp.bfloat16) -> dict:
    """Params of the dense model in ``dtype`` (boxed with logical axis names)."""
    model = Llama(cfg, dtype=dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(jax.random.key(seed), tokens, init_cache(cfg, 1, 1), 0)["params"]


def init_params(cfg: Config, seed: int = 0, quant: Optional[dict] = None, quantize_head: bool = False,
                dtype=jnp.bfloat16, mesh: Optional[jax.sharding.Mesh] = None, rules: tuple = ()) -> dict:
    """Random (unboxed) params of ``Llama(cfg, quant, quantize_head, dtype)``, made a layer at a time.

    The same tree as ``Llama.init`` gives, but each decoder layer is one call of a single
    compiled init program (with its own key), so a 70B-shaped model is never held in full
    precision at once: a FluteDense layer quantizes its kernel inside the program that draws
    it. With ``mesh``, every leaf is created where the logical axis ``rules`` put it (the
    program's output shardings), so each device only ever holds its own shards.
    """
    key = jax.random.key(seed)

    def init_program(module: nn.Module, *args):
        def init(k):
            return module.init(k, *args)["params"]

        shardings = None
        if mesh is not None:
            specs = nn.get_partition_spec(jax.eval_shape(init, key))
            shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
        return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)

    # embedding, final norm and head: the model with no decoder layers
    outer = Llama(dataclasses.replace(cfg, layers=0), quant, quantize_head, dtype)
    params = dict(init_program(outer, jnp.zeros((1, 1), jnp.int32), (), 0)(jax.random.fold_in(key, cfg.layers)))
    layer_cache = (jnp.zeros((1, 1, cfg.kv_heads, cfg.head_dim), dtype),) * 2
    block = init_program(Block(cfg, quant, dtype), jnp.zeros((1, 1, cfg.dim), dtype), layer_cache, 0)
    for i in range(cfg.layers):
        params[f"layers_{i}"] = block(jax.random.fold_in(key, i))
    return params


def quantize(params: dict, bits: int, group_size: int, table: str = "nf", quantize_head: bool = False,
             dtype=jnp.bfloat16) -> dict:
    """The dense model's params -> the FLUTE model's (lm_head and embedding stay bf16 by default)."""
    where = None if quantize_head else (lambda path, kernel: path[-1] != "lm_head")
    return fnn.quantize_params(params, bits=bits, group_size=group_size, table=table, dtype=dtype, where=where)


# ----------------------------------------------------------------------------- running it
def make_step(model: Llama):
    """jit-compiled ``(params, tokens, cache, pos) -> (logits, cache)``; the cache is donated."""
    return jax.jit(lambda p, tok, cache, pos: model.apply({"params": p}, tok, cache, pos), donate_argnums=(2,))


def make_decode_loop(model: Llama, steps: int):
    """jit-compiled greedy decoding of ``steps`` tokens in one call (a ``lax.scan`` on the device):
    ``(params, token int32 [B, 1], cache, pos) -> (tokens int32 [B, steps], cache)``; the cache
    is donated. One host call per ``steps`` tokens instead of one per token, so the host's cost
    per call (hundreds of argument buffers and kernel launches) does not pace the GPU.
    """

    def loop(p, token, cache, pos):
        def body(carry, i):
            token, cache = carry
            logits, cache = model.apply({"params": p}, token, cache, pos + i)
            token = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
            return (token, cache), token[:, 0]

        (_, cache), tokens = jax.lax.scan(body, (token, cache), jnp.arange(steps, dtype=jnp.int32))
        return tokens.T, cache

    return jax.jit(loop, donate_argnums=(2,))


def generate(model: Llama, params, prompt: np.ndarray, steps: int, step=None) -> np.ndarray:
    """Greedy decoding: prompt int32 [B, T] -> [B, T + steps]."""
    step = step or make_step(model)
    b, t = prompt.shape
    cache = init_cache(model.cfg, b, t + steps)
    logits, cache = step(params, jnp.asarray(prompt), cache, jnp.int32(0))
    out = [np.asarray(prompt)]
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    for i in range(steps):
        out.append(np.asarray(token)[:, None])
        if i == steps - 1:
            break
        logits, cache = step(params, token[:, None], cache, jnp.int32(t + i))
        token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    return np.concatenate(out, 1)


def full_logits(model: Llama, params, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced logits float32 [B, T, vocab] of a whole sequence in one pass."""
    b, t = tokens.shape
    logits, _ = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, c, 0))(params, jnp.asarray(tokens), init_cache(model.cfg, b, t))
    return np.asarray(logits)


def agreement(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """Top-1 token match rate and mean cosine similarity of logit vectors."""
    match = float(np.mean(ref_logits.argmax(-1) == logits.argmax(-1)))
    a, b = ref_logits.astype(np.float64), logits.astype(np.float64)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"top1_match": match, "logit_cosine": float(np.mean(cos))}


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a .safetensors file with numpy: 8-byte little-endian header length, JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into the data after the
    header), then the raw little-endian tensor bytes. Memory-mapped, so big files are cheap."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = data[begin:end].view(np.dtype(_ST_DTYPES[info["dtype"]])).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write tensors in the safetensors format (for tests and tiny checkpoints)."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def config_from_hf(hf: dict) -> Config:
    scaling = hf.get("rope_scaling") or None
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
        scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                   int(scaling["original_max_position_embeddings"]))
    elif scaling is not None:
        raise ValueError(f"unsupported rope_scaling {scaling}")
    heads = hf["num_attention_heads"]
    return Config(vocab=hf["vocab_size"], dim=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=heads,
                  kv_heads=hf.get("num_key_value_heads", heads), hidden=hf["intermediate_size"],
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, norm_eps=hf.get("rms_norm_eps", 1e-5),
                  rope_theta=hf.get("rope_theta", 10000.0), rope_scaling=scaling,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def load_hf(directory: str) -> tuple[Config, dict]:
    """A Hugging Face Llama checkpoint directory -> (Config, bf16 params of :class:`Llama`).

    HF stores Linear weights as [out, in]; Flax kernels are [in, out], hence the transposes.
    q/k/v_proj and gate/up_proj go into the fused ``qkv`` and ``gate_up`` kernels in Block's
    feature orders (built layer by layer in bf16 with numpy).
    """
    with open(os.path.join(directory, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    tensors = {}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    for path in files:
        tensors.update(read_safetensors(path))
    get = lambda name: jnp.asarray(np.asarray(tensors[name]), jnp.bfloat16)  # noqa: E731
    kernel = lambda name: {"kernel": get(name).T}  # noqa: E731
    params = {"embed": {"embedding": get("model.embed_tokens.weight")}, "norm": {"scale": get("model.norm.weight")}}
    group, d = cfg.heads // cfg.kv_heads, cfg.head_dim
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        t = lambda name: np.asarray(tensors[p + name]).astype(jnp.bfloat16, copy=False).T  # noqa: E731  [in, out]
        # the fused layouts of Block: qkv features [kv_heads, group + 2, head_dim], gate_up [hidden / 8, 2, 8]
        qkv = np.concatenate([t("self_attn.q_proj.weight").reshape(cfg.dim, cfg.kv_heads, group, d),
                              t("self_attn.k_proj.weight").reshape(cfg.dim, cfg.kv_heads, 1, d),
                              t("self_attn.v_proj.weight").reshape(cfg.dim, cfg.kv_heads, 1, d)], axis=2)
        gate_up = flute_jax.epilogue.interleave_gate_up(t("mlp.gate_proj.weight"), t("mlp.up_proj.weight"))
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": get(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "qkv": {"kernel": jnp.asarray(qkv.reshape(cfg.dim, -1), jnp.bfloat16)},
            "o": kernel(p + "self_attn.o_proj.weight"),
            "gate_up": {"kernel": jnp.asarray(gate_up.reshape(cfg.dim, -1), jnp.bfloat16)},
            "down": kernel(p + "mlp.down_proj.weight"),
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = kernel("lm_head.weight")
    return cfg, params


# ----------------------------------------------------------------------------- benchmark
def bench_decode(model: Llama, params, batch: int, context: int, steps: int = 32, warmup: int = 3,
                 loop: bool = False, repeats: int = 3, place=None) -> float:
    """Decode tokens/s (batch * steps / time) with the KV cache filled to ``context``.

    ``loop=False``: one jitted call per token (the host dispatches every step).
    ``loop=True``: ``steps`` tokens per call (:func:`make_decode_loop`), median of ``repeats``.
    ``place``: puts the token batch and the cache where the params' program wants them
    (e.g. sharded over a mesh; tp_inference.py); default: the default device.
    """
    place = place or (lambda tree: tree)
    token = place(jnp.zeros((batch, 1), jnp.int32))
    if loop:
        run = make_decode_loop(model, steps)
        cache = place(init_cache(model.cfg, batch, context + steps, model.dtype))
        tokens, cache = run(params, token, cache, jnp.int32(context))  # compile and warm up
        jax.block_until_ready(tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokens, cache = run(params, token, cache, jnp.int32(context))
            jax.block_until_ready(tokens)
            times.append(time.perf_counter() - start)
        return batch * steps / float(np.median(times))
    step = make_step(model)
    cache = place(init_cache(model.cfg, batch, context + steps + warmup, model.dtype))
    for i in range(warmup):
        logits, cache = step(params, token, cache, jnp.int32(context + i))
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for i in range(steps):
        logits, cache = step(params, token, cache, jnp.int32(context + warmup + i))
    jax.block_until_ready(logits)
    return batch * steps / (time.perf_counter() - start)


# name -> (quantization, lm head quantized too)
BENCH_VARIANTS = {
    "bf16": (None, False),
    "4bit-g64": (dict(bits=4, group_size=64), False),
    "4bit-g128": (dict(bits=4, group_size=128), False),
    "3bit-g64": (dict(bits=3, group_size=64), False),
    "4bit-g128-head": (dict(bits=4, group_size=128), True),
}


def bench_variant(cfg: Config, dense: dict, name: str, attention: str = "auto", norm: str = "auto",
                  mlp: str = "fused") -> tuple[Llama, dict]:
    """The model and params of benchmark variant ``name`` (NF table), from the bf16 params."""
    quant, head = BENCH_VARIANTS[name]
    params = dense if quant is None else quantize(dense, **quant, quantize_head=head)
    model = Llama(cfg, quant=None if quant is None else dict(quant, table="nf"), quantize_head=head, attention=attention,
                  norm=norm, mlp=mlp)
    return model, params


def run_bench(cfg: Config, seed: int, batches=(1, 4, 16), context: int = 512, steps: int = 32,
              modes=("step", "loop"), variants=tuple(BENCH_VARIANTS), attention: str = "auto",
              norm: str = "auto", mlp: str = "fused") -> list[dict]:
    """tokens/s of every variant at every batch size, per mode ("step": a host call per token,
    "loop": ``steps`` tokens per call), with the speed-up over bf16 in the same mode. Every
    variant, bf16 included, runs its attention layers by ``attention`` (see ``ATTENTION``) and
    its norms by ``norm`` (``NORM``), and the quantized variants their MLP gate by ``mlp`` (``MLP``)."""
    dense = nn.meta.unbox(random_params(cfg, seed))
    rows = []
    for name in variants:
        model, params = bench_variant(cfg, dense, name, attention, norm, mlp)
        for mode in modes:
            for batch in batches:
                tps = bench_decode(model, params, batch, context, steps, loop=mode == "loop")
                rows.append({"variant": name, "mode": mode, "batch": batch, "context": context, "attention": attention,
                             "norm": norm, "mlp": mlp, "tokens_per_s": tps})
                print(f"{name:14s} {mode:4s} batch {batch:3d} context {context} attention {attention} norm {norm} "
                      f"mlp {mlp}: {tps:9.1f} tokens/s", flush=True)
        del params  # free a quantized copy before the next variant is made
    base = {(r["mode"], r["batch"]): r["tokens_per_s"] for r in rows if r["variant"] == "bf16"}
    for r in rows:
        r["speedup_vs_bf16"] = r["tokens_per_s"] / base[(r["mode"], r["batch"])] if base else None
    print(json.dumps(rows, indent=1))
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--hf", help="Hugging Face Llama checkpoint directory (config.json, *.safetensors)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--table", default="nf")
    ap.add_argument("--quantize-head", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--prompt-ids", help="comma-separated prompt token ids (one sequence)")
    ap.add_argument("--steps", type=int, default=16, help="tokens to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="decode tokens/s of bf16, 4bit-g64, 4bit-g128, 3bit-g64 and 4bit-g128-head (lm head quantized too)")
    ap.add_argument("--bench-batches", default="1,4,16")
    ap.add_argument("--bench-variants", default=",".join(BENCH_VARIANTS), help="a comma-separated subset of " + ", ".join(BENCH_VARIANTS))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--attention", default="auto", choices=ATTENTION,
                    help="decode steps' attention layers: Pallas kernels on NVIDIA GPUs (auto), pallas, cudnn, or xla "
                         "(see ATTENTION in this file)")
    ap.add_argument("--norm", default="auto", choices=NORM,
                    help="residual adds and RMSNorms: one Pallas kernel each on NVIDIA GPUs (auto), pallas, or xla "
                         "(see NORM in this file)")
    ap.add_argument("--mlp", default="fused", choices=MLP,
                    help="the quantized model's MLP gate: in gate_up's FLUTE kernel (fused) or after it (see MLP in this file)")
    ap.add_argument("--bench-modes", default="step,loop",
                    help="step: one host call per token; loop: 32 tokens per call (lax.scan on the device)")
    args = ap.parse_args(argv)
    unknown = set(args.bench_variants.split(",")) - set(BENCH_VARIANTS)
    if unknown:
        ap.error(f"unknown --bench-variants {sorted(unknown)}; choose from {', '.join(BENCH_VARIANTS)}")

    if args.hf:
        cfg, dense = load_hf(args.hf)
    else:
        cfg = CONFIGS[args.config]
        if args.bench:
            return {"bench": run_bench(cfg, args.seed, tuple(int(b) for b in args.bench_batches.split(",")), args.context,
                                      modes=tuple(args.bench_modes.split(",")),
                                      variants=tuple(args.bench_variants.split(",")), attention=args.attention,
                                      norm=args.norm, mlp=args.mlp)}
        dense = nn.meta.unbox(random_params(cfg, args.seed))
    quant = dict(bits=args.bits, group_size=args.group_size, table=args.table)
    qparams = quantize(dense, args.bits, args.group_size, args.table, args.quantize_head)
    dense_model = Llama(cfg, attention=args.attention, norm=args.norm)
    flute_model = Llama(cfg, quant=quant, quantize_head=args.quantize_head, attention=args.attention, norm=args.norm,
                        mlp=args.mlp)

    if args.prompt_ids:
        prompt = np.array([[int(t) for t in args.prompt_ids.split(",")]], np.int32)
    else:
        prompt = np.random.default_rng(args.seed).integers(0, cfg.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    dense_tokens = generate(dense_model, dense, prompt, args.steps)
    flute_tokens = generate(flute_model, qparams, prompt, args.steps)
    # agreement on the same (bf16-generated) sequence, teacher-forced
    stats = agreement(full_logits(dense_model, dense, dense_tokens), full_logits(flute_model, qparams, dense_tokens))
    stats.update(
        generated_match=float(np.mean(dense_tokens[:, prompt.shape[1]:] == flute_tokens[:, prompt.shape[1]:])),
        dense_bytes=fnn.tree_bytes(dense),
        flute_bytes=fnn.tree_bytes(qparams),
    )
    print(f"config {args.config if not args.hf else args.hf}: {cfg}")
    print(f"params: bf16 {stats['dense_bytes'] / 2**20:.1f} MiB -> flute {args.bits}-bit g{args.group_size} "
          f"{stats['flute_bytes'] / 2**20:.1f} MiB")
    print(f"bf16  tokens: {dense_tokens[0].tolist()}")
    print(f"flute tokens: {flute_tokens[0].tolist()}")
    print(f"top-1 match {stats['top1_match']:.3f}  logit cosine {stats['logit_cosine']:.4f}  "
          f"greedy continuation match {stats['generated_match']:.3f}")
    stats["dense_tokens"], stats["flute_tokens"] = dense_tokens, flute_tokens
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
