"""Learned Normal Float (NFL): learn group scales (and optionally the table) on calibration data.

FLUTE's NFL starts from normal-float (NF) quantization and learns the quantization
parameters so that each layer's *output* on calibration activations stays close to
the float layer's output:

    minimise  L(s, T) = || X W - X W_hat(s, T) ||_F^2,   W_hat[k, n] = T[c[k, n]] * s[k // g, n]

with the codes ``c`` re-chosen at every step as the nearest table entry of
``W / s`` (rounding to the stored dtype included), and gradients through the
rounding by a straight-through estimator (STE):

* scales: ``W_hat = s * q_ste`` where ``q_ste = T[c] + (u - stop_grad(u))``, ``u = W / s``,
  so ``dW_hat / ds = T[c] - u`` (LSQ's gradient) where ``u`` lies inside the table's
  range, and ``T[c]`` where it is clipped (the scale must grow to reach it);
* table: the gather ``T[c]`` passes gradients to the entries used;
* storage: scales and table are rounded to the stored dtype in the forward pass
  (STE again), so the loss the optimiser sees is the loss of the weight it returns.

Scales are learned multiplicatively (``s = s0 * exp(a)``, ``a = 0`` at the start) so one
learning rate fits groups of any magnitude; the table additively in units of its
absmax. The optimiser is optax's Adam. The best iterate (by training loss) is kept.

Codes of the result: the nearest entry of the learned (stored) table to ``W / s`` with
the learned (stored) scale, exactly as :func:`flute_jax.quantize` chooses codes for
its own scales. So a result is always "quantize with these scales and this table".

Guarantee: the returned weight's calibration output error, evaluated in float64 on
the host, is never larger than the NF starting point's; if learning did not beat the
start (strictly), the NF quantization itself is returned.

The loss uses the Gram matrix ``H = X^T X`` (``[K, K]``) when there are more
calibration rows than input features, which makes a step cost ``K^2 N`` instead of
``M K N``. Everything is computed with differentiable jnp ops on the dequantized
weight (no qgemm), in float32 at HIGHEST matmul precision.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import layout, tables
from .quantize import (
    QuantizedWeight,
    check_activation_dtype,
    check_group_size,
    compute_codes_and_scales,
    weight_from_codes,
)

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """Calibration result of one ``[K, N]`` kernel.

    Errors are relative output errors ``||X W - X W_hat||_F / ||X W||_F`` on the
    calibration activations, computed in float64.
    """

    name: str
    start_error: float  # the NF (or given table) starting point
    final_error: float  # what calibrate returned (<= start_error)
    learned: bool  # False when the start was kept because learning did not beat it
    steps: int


# ----------------------------------------------------------------------------- helpers


def output_error(x, w, w_hat) -> float:
    """Relative output error ``||x w - x w_hat||_F / ||x w||_F`` in float64.

    x: ``[..., K]``; w, w_hat: ``[K, N]``. Any float dtypes (cast to float64 on the host).
    """
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, np.shape(w)[0])
    w64 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    wh64 = np.asarray(jnp.asarray(w_hat, jnp.float32), np.float64)
    ref = x64 @ w64
    return float(np.linalg.norm(ref - x64 @ wh64) / max(np.linalg.norm(ref), 1e-300))


def nearest_codes(u: jax.Array, table: jax.Array) -> jax.Array:
    """Index of the nearest entry of ``table`` (any order) for each value of ``u``.

    Ties go to the smaller table value, as in :func:`flute_jax.quantize`. Traceable.
    """
    order = jnp.argsort(table, stable=True)
    st = table[order]
    midpoints = (st[1:] + st[:-1]) / 2
    return order[jnp.searchsorted(midpoints, u, side="left")].astype(jnp.uint8)


def _expand(scales: jax.Array, rows: int, k: int) -> jax.Array:
    """``[G, N]`` group scales -> ``[K, N]`` per-row scales."""
    return jnp.repeat(scales, rows, axis=0)[:k]


def _normalize(w: jax.Array, s_full: jax.Array) -> jax.Array:
    # A zero scale (all-zero group) maps its weights to 0, as quantize() does.
    return jnp.where(s_full == 0, 0.0, w / jnp.where(s_full == 0, 1.0, s_full))


def _ste_cast(v: jax.Array, dtype) -> jax.Array:
    """Round to ``dtype`` in the forward pass, identity in the backward pass."""
    return v + jax.lax.stop_gradient(v.astype(dtype).astype(jnp.float32) - v)


def _weight_hat(params, w, s0, t0, t_unit, rows, dtype):
    """Differentiable dequantized weight ``[K, N]`` float32 for the current parameters."""
    k = w.shape[0]
    s = _ste_cast(s0 * jnp.exp(params["log_scale"]), dtype)
    t = _ste_cast(t0 + t_unit * params["table"], dtype)
    s_full = _expand(s, rows, k)
    u = _normalize(w, s_full)
    codes = jax.lax.stop_gradient(nearest_codes(u, t))
    clipped = (u < jnp.min(t)) | (u > jnp.max(t))
    q = t[codes] + jnp.where(clipped, 0.0, u - jax.lax.stop_gradient(u))
    return s_full * q


def _finalize(params, w, s0, t0, t_unit, rows, dtype, bits, group_size) -> QuantizedWeight:
    """Stored scales/table from the learned parameters; codes = nearest entry (as quantize)."""
    k, n = w.shape
    scales = (s0 * jnp.exp(params["log_scale"])).astype(dtype)
    table = (t0 + t_unit * params["table"]).astype(dtype)
    u = _normalize(w, _expand(scales.astype(jnp.float32), rows, k))
    codes = nearest_codes(u, table.astype(jnp.float32))
    return weight_from_codes(codes, scales, table, bits, group_size)


def _dequantize_f64(qw: QuantizedWeight) -> np.ndarray:
    codes = np.asarray(layout.unpack(qw.codes, qw.bits, qw.shape)).astype(np.int64)
    t = np.asarray(qw.table.astype(jnp.float32), np.float64)
    s = np.asarray(qw.scales.astype(jnp.float32), np.float64)
    return t[codes] * np.repeat(s, qw.group_rows, axis=0)[: qw.shape[0]]


def _sq_output_error(x64: np.ndarray, w64: np.ndarray, qw: QuantizedWeight) -> float:
    d = w64 - _dequantize_f64(qw)
    return float(np.sum((x64 @ d) ** 2))


def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def _loss(params, consts, *, rows, dtype, use_gram):
    """Relative squared output error of the current quantized weight (float32)."""
    wf, data, s0, t0, t_unit, norm = consts
    d = wf - _weight_hat(params, wf, s0, t0, t_unit, rows, dtype)
    if use_gram:
        sq = jnp.sum(d * jnp.matmul(data, d, precision=_HIGHEST))
    else:
        sq = jnp.sum(jnp.matmul(data, d, precision=_HIGHEST) ** 2)
    return sq / norm


_loss_jit = jax.jit(_loss, static_argnames=("rows", "dtype", "use_gram"))


@functools.partial(jax.jit, static_argnames=("rows", "dtype", "use_gram", "learn_table", "learning_rate"))
def _train_step(carry, consts, *, rows, dtype, use_gram, learn_table, learning_rate):
    """One Adam step; also keeps the best parameters seen (by their loss before the step)."""
    params, opt_state, best_params, best_loss = carry
    loss, grads = jax.value_and_grad(_loss)(params, consts, rows=rows, dtype=dtype, use_gram=use_gram)
    if not learn_table:
        # A zero gradient keeps Adam's moments, hence the table, at exactly zero change.
        grads = {**grads, "table": jnp.zeros_like(grads["table"])}
    better = loss < best_loss
    best_params = jax.tree.map(lambda b, p: jnp.where(better, p, b), best_params, params)
    best_loss = jnp.where(better, loss, best_loss)
    updates, opt_state = _adam(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, best_params, best_loss


# ----------------------------------------------------------------------------- one kernel


def calibrate_kernel(
    w,
    x,
    *,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype=jnp.bfloat16,
    learn_table: bool = False,
    steps: int = 100,
    learning_rate: float = 5e-3,
    name: str = "kernel",
    progress: bool = True,
) -> tuple[QuantizedWeight, LayerReport]:
    """Learn the scales (and optionally the table) of one weight on its input activations.

    Args:
      w: float ``[K, N]`` kernel (Flax layout: in features, out features).
      x: float ``[..., K]`` calibration inputs of this layer (flattened to ``[M, K]``).
      bits, group_size, table, dtype: as in :func:`flute_jax.quantize`; ``table`` is the
        starting table (``"nf"`` gives FLUTE's NFL).
      learn_table: also learn the ``2**bits`` table entries (shared by the whole kernel).
      steps: Adam steps; 0 returns the starting quantization.
      learning_rate: Adam step size for log-scales and for table entries in units of
        the table's absmax.
      name: label of the progress bar and the report.
      progress: show a tqdm progress bar.

    Returns:
      ``(qw, report)``: a :class:`QuantizedWeight` in the usual packed format and its
      :class:`LayerReport`. ``report.final_error <= report.start_error`` always.
    """
    bits = tables.check_bits(bits)
    group_size = check_group_size(group_size)
    dtype = check_activation_dtype(dtype)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if not hasattr(w, "shape") or len(w.shape) != 2 or min(w.shape) < 1:
        raise ValueError(f"w must be a 2-D [K, N] array, got shape {getattr(w, 'shape', None)}")
    k, n = w.shape
    if not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] for a kernel of shape {tuple(w.shape)}, got {getattr(x, 'shape', None)}")
    for arr, what in ((w, "w"), (x, "x")):
        if not jnp.issubdtype(jnp.asarray(arr).dtype, jnp.floating):
            raise TypeError(f"{what} must be a float array, got {jnp.asarray(arr).dtype}")

    table_stored = tables.resolve(table, bits).astype(dtype).astype(np.float64)
    wf = jnp.asarray(w, jnp.float32)
    xf = jnp.asarray(x, jnp.float32).reshape(-1, k)
    if not (bool(jnp.all(jnp.isfinite(wf))) and bool(jnp.all(jnp.isfinite(xf)))):
        raise ValueError("w and x must be finite")
    m = xf.shape[0]
    if m == 0:
        raise ValueError("x has no calibration rows")
    rows = k if group_size == -1 else group_size

    # Starting point: exactly flute_jax.quantize's codes and scales for this table.
    codes0, scales0 = compute_codes_and_scales(wf, table_stored, group_size, dtype)
    start = weight_from_codes(codes0, scales0, table_stored.astype(dtype), bits, group_size)
    if not bool(jnp.all(jnp.isfinite(scales0))):
        raise ValueError(f"non-finite scales: a group absmax overflows {dtype}")

    x64 = np.asarray(xf, np.float64)
    w64 = np.asarray(wf, np.float64)
    ref_sq = float(np.sum((x64 @ w64) ** 2))
    start_sq = _sq_output_error(x64, w64, start)

    def rel(sq: float) -> float:
        return float(np.sqrt(sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(sq))

    if steps == 0 or start_sq == 0.0:
        return start, LayerReport(name, rel(start_sq), rel(start_sq), False, 0)

    s0 = scales0.astype(jnp.float32)
    t0 = jnp.asarray(table_stored, jnp.float32)
    t_unit = jnp.float32(np.abs(table_stored).max())
    # Gram form when there are more rows than features: ||X D||^2 = sum(D * (H D)).
    use_gram = m > k
    data = jnp.matmul(xf.T, xf, precision=_HIGHEST) if use_gram else xf
    consts = (wf, data, s0, t0, t_unit, jnp.float32(max(ref_sq, 1e-30)))
    statics = dict(rows=rows, dtype=dtype, use_gram=use_gram, learn_table=bool(learn_table),
                   learning_rate=float(learning_rate))
    params = {"log_scale": jnp.zeros_like(s0), "table": jnp.zeros_like(t0)}
    carry = (params, _adam(float(learning_rate)).init(params), params, jnp.float32(jnp.inf))
    bar = tqdm(range(steps), desc=name, disable=not progress, leave=False)
    for _ in bar:
        carry = _train_step(carry, consts, **statics)
    bar.close()
    # The last update's iterate has not been evaluated yet: one more forward pass.
    last_loss = _loss_jit(carry[0], consts, rows=rows, dtype=dtype, use_gram=use_gram)
    best_params = carry[0] if bool(last_loss < carry[3]) else carry[2]

    learned = _finalize(best_params, wf, s0, t0, t_unit, rows, dtype, bits, group_size)
    learned_sq = _sq_output_error(x64, w64, learned)
    if learned_sq < start_sq:
        return learned, LayerReport(name, rel(start_sq), rel(learned_sq), True, steps)
    return start, LayerReport(name, rel(start_sq), rel(start_sq), False, steps)


# ----------------------------------------------------------------------------- param trees


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _activation_index(activations: Mapping) -> dict[str, Any]:
    """Activations keyed by module path ``"a/b"`` (a trailing ``/kernel`` is dropped)."""
    if not isinstance(activations, Mapping):
        raise TypeError(f"activations must be a mapping, got {type(activations).__name__}")
    index = {}
    for path, value in _flatten(activations).items():
        for part in path:
            if not isinstance(part, str):
                raise TypeError(f"activation keys must be strings, got {part!r}")
        parts = "/".join(path).split("/")
        if parts[-1] == "kernel":
            parts = parts[:-1]
        key = "/".join(parts)
        if key in index:
            raise ValueError(f"activations given twice for module {key!r}")
        index[key] = value
    return index


def calibrate(
    params: Mapping,
    activations: Mapping,
    *,
    bits: int = 4,
    group_size: int = 64,
    table: Any = "nf",
    dtype=jnp.bfloat16,
    learn_table: bool = False,
    steps: int = 100,
    learning_rate: float = 5e-3,
    progress: bool = True,
    return_report: bool = False,
):
    """Learned Normal Float over a Flax param tree: replace each calibrated kernel by a QuantizedWeight.

    Args:
      params: a Flax param tree (nested mappings, e.g. ``variables["params"]`` or the whole
        ``{"params": ...}``). Every leaf named ``kernel`` with shape ``[K, N]`` or ``[*L, K, N]`` (layers stacked by ``nn.scan`` /
        ``nn.vmap``; leading axes are layer axes) *that has activations* is calibrated.
      activations: per-layer inputs, keyed by the kernel's module path, either nested like
        the params (``{"layers_0": {"Dense_0": x}}``, optionally ending in ``"kernel"``) or
        flat with ``"/"``-joined keys (``{"layers_0/Dense_0": x}``). A path relative to a
        top-level ``"params"`` collection also matches. Shapes: ``[..., K]`` for a ``[K, N]``
        kernel, ``[*L, ..., K]`` (one batch per stacked layer) for a stacked one.
      bits, group_size, table, dtype, learn_table, steps, learning_rate: see
        :func:`calibrate_kernel`.
      progress: one tqdm progress bar per layer (per stacked slice).
      return_report: also return ``{module path (+ "[l]" per stacked layer): LayerReport}``.

    Returns:
      A new param tree (plain dicts) where each calibrated ``kernel`` is a
      :class:`QuantizedWeight`; for a stacked kernel, one QuantizedWeight whose array
      leaves carry the leading ``L`` axes (static metadata ``shape=(K, N)`` per layer), the
      form ``flute_jax.nn.quantize_params`` gives and ``nn.scan`` / ``jax.vmap`` consume. Kernels without activations
      and all other leaves are returned unchanged. Raises ValueError for activations that
      match no kernel or have the wrong shape.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (a Flax param tree), got {type(params).__name__}")
    flat = _flatten(params)
    index = _activation_index(activations)
    kernels = {"/".join(map(str, p[:-1])): p for p in flat if p[-1] == "kernel"}
    # Allow activation keys relative to a top-level "params" collection.
    for key in list(index):
        if key not in kernels and f"params/{key}" in kernels:
            index[f"params/{key}"] = index.pop(key)
    unknown = sorted(set(index) - set(kernels))
    if unknown:
        raise ValueError(f"activations for {unknown} match no 'kernel' in params; kernels: {sorted(kernels)}")

    options = dict(
        bits=bits,
        group_size=group_size,
        table=table,
        dtype=dtype,
        learn_table=learn_table,
        steps=steps,
        learning_rate=learning_rate,
        progress=progress,
    )
    reports: dict[str, LayerReport] = {}
    out = dict(flat)
    for module, path in kernels.items():
        if module not in index:
            continue
        kernel, x = flat[path], index[module]
        if not hasattr(kernel, "ndim") or kernel.ndim < 2:
            raise ValueError(f"kernel {module!r} must be [K, N] or stacked [*L, K, N], got {getattr(kernel, 'shape', None)}")
        if kernel.ndim == 2:
            qw, rep = calibrate_kernel(kernel, x, name=module, **options)
            out[path], reports[module] = qw, rep
            continue
        lead, (k, n) = tuple(kernel.shape[:-2]), kernel.shape[-2:]
        if not hasattr(x, "shape") or len(x.shape) < len(lead) + 1 or tuple(x.shape[: len(lead)]) != lead:
            raise ValueError(
                f"stacked kernel {module!r} of shape {tuple(kernel.shape)} needs activations "
                f"[{', '.join(map(str, lead))}, ..., {k}] (one batch per layer), got {getattr(x, 'shape', None)}"
            )
        kernels_flat = jnp.reshape(jnp.asarray(kernel), (-1, k, n))
        x_flat = jnp.reshape(jnp.asarray(x), (kernels_flat.shape[0], -1, x.shape[-1]))
        slices = []
        for layer in range(kernels_flat.shape[0]):
            label = f"{module}[{', '.join(map(str, np.unravel_index(layer, lead)))}]"
            qw, rep = calibrate_kernel(kernels_flat[layer], x_flat[layer], name=label, **options)
            slices.append(qw)
            reports[label] = rep
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *slices)
        out[path] = jax.tree.map(lambda leaf: jnp.reshape(leaf, lead + leaf.shape[1:]), stacked)
    result = _unflatten(out)
    return (result, reports) if return_report else result


__all__ = ["LayerReport", "calibrate", "calibrate_kernel", "nearest_codes", "output_error"]
