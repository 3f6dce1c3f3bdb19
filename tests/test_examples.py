"""The examples run (tiny configs, CPU) and say what they should."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flute_jax as fj

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import llama  # noqa: E402
import quickstart  # noqa: E402
import tp_inference  # noqa: E402


def test_quickstart():
    results = quickstart.main([])
    for (bits, _, _), r in results.items():
        assert r["kernel_error"] < 1e-2  # bf16 output rounding
        assert r["quantization_error"] < {4: 0.12, 3: 0.25, 2: 0.6}[bits]


def test_llama_tiny_quantized_agrees():
    # 64 positions: a random tiny model's logits are nearly flat, so top-1 agreement over
    # few positions swings with the seed (0.46 to 0.79 over 24); the cosine is the steady signal.
    stats = llama.main(["--steps", "8", "--prompt-len", "8", "--batch", "4"])
    assert stats["flute_bytes"] < 0.45 * stats["dense_bytes"]  # embed + head stay bf16
    assert stats["top1_match"] > 0.5 and stats["logit_cosine"] > 0.98
    np.testing.assert_array_equal(stats["dense_tokens"][:, :8], stats["flute_tokens"][:, :8])  # the prompt


def test_kv_cache_decode_matches_full_pass():
    cfg = llama.CONFIGS["tiny-tied"]
    params = nn.meta.unbox(llama.random_params(cfg, seed=3, dtype=jnp.float32))
    model = llama.Llama(cfg, dtype=jnp.float32)
    tokens = llama.generate(model, params, np.array([[1, 2, 3]], np.int32), 5)
    full = llama.full_logits(model, params, tokens)
    # greedy decoding with the cache picked the argmax of the full (cache-free) pass at each step
    np.testing.assert_array_equal(full[0, 2:-1].argmax(-1), tokens[0, 3:])


def test_decode_loop_matches_step_by_step():
    # the on-device scan of the benchmark generates what per-token calls generate (quantized model)
    cfg = llama.CONFIGS["tiny"]
    dense = nn.meta.unbox(llama.random_params(cfg, seed=5))
    params = llama.quantize(dense, bits=4, group_size=64)
    model = llama.Llama(cfg, quant=dict(bits=4, group_size=64, table="nf"))
    prompt = np.array([[7, 3, 9], [1, 2, 4]], np.int32)
    tokens = llama.generate(model, params, prompt, 6)
    step = llama.make_step(model)
    cache = llama.init_cache(cfg, 2, 9)
    logits, cache = step(params, jnp.asarray(prompt), cache, jnp.int32(0))
    first = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    looped, _ = llama.make_decode_loop(model, 5)(params, first, cache, jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(first)[:, 0], tokens[:, 3])
    np.testing.assert_array_equal(np.asarray(looped), tokens[:, 4:])
    assert llama.bench_decode(model, params, 1, context=4, steps=2, loop=True, repeats=1) > 0


def test_fused_mlp_gate_matches_unfused():
    # The quantized model with silu(gate) * up in gate_up's kernel (mlp="fused") against the same
    # params with the gate after it (mlp="unfused"): the same model up to bf16 roundings.
    cfg = llama.CONFIGS["tiny"]
    params = llama.quantize(nn.meta.unbox(llama.random_params(cfg, seed=11)), bits=4, group_size=64)
    quant = dict(bits=4, group_size=64, table="nf")
    tokens = np.array([[5, 1, 8, 2, 9, 4]], np.int32)
    fused = llama.full_logits(llama.Llama(cfg, quant=quant, mlp="fused"), params, tokens)
    unfused = llama.full_logits(llama.Llama(cfg, quant=quant, mlp="unfused"), params, tokens)
    rel = np.linalg.norm(fused - unfused) / np.linalg.norm(unfused)
    assert 0 < rel < 2e-2  # not the same program (rel 0 would mean the option did nothing), the same model
    with pytest.raises(ValueError, match="mlp must be one of"):
        llama.full_logits(llama.Llama(cfg, quant=quant, mlp="other"), params, tokens)


def hf_llama_tensors(r, vocab: int, dim: int, kv_dim: int, hidden: int, layers: int = 2) -> dict:
    """A Hugging Face Llama checkpoint's tensors ([out, in] Linear weights), drawn with ``r(*shape)``."""
    tensors = {"model.embed_tokens.weight": r(vocab, dim), "model.norm.weight": 1 + r(dim), "lm_head.weight": r(vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": 1 + r(dim), p + "post_attention_layernorm.weight": 1 + r(dim),
                        p + "self_attn.q_proj.weight": r(dim, dim), p + "self_attn.k_proj.weight": r(kv_dim, dim),
                        p + "self_attn.v_proj.weight": r(kv_dim, dim), p + "self_attn.o_proj.weight": r(dim, dim),
                        p + "mlp.gate_proj.weight": r(hidden, dim), p + "mlp.up_proj.weight": r(hidden, dim),
                        p + "mlp.down_proj.weight": r(dim, hidden)})
    return tensors


def test_hf_safetensors_loader(tmp_path, rng):
    hf = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    tensors = hf_llama_tensors(r, vocab=96, dim=64, kv_dim=32, hidden=128)
    # two shards, one in bf16, as HF writes big checkpoints
    names = sorted(tensors)
    llama.write_safetensors(str(tmp_path / "model-00001.safetensors"), {n: tensors[n] for n in names[:9]})
    llama.write_safetensors(str(tmp_path / "model-00002.safetensors"),
                            {n: tensors[n].astype(jnp.bfloat16) for n in names[9:]})
    back = llama.read_safetensors(str(tmp_path / "model-00002.safetensors"))
    assert back[names[9]].dtype == jnp.bfloat16
    cfg, params = llama.load_hf(str(tmp_path))
    assert (cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_scaling) == (64, 4, 2, 16, (8.0, 1.0, 4.0, 64))
    expected = np.asarray(jnp.asarray(tensors["model.layers.1.mlp.down_proj.weight"], jnp.bfloat16)).T
    np.testing.assert_array_equal(params["layers_1"]["down"]["kernel"], expected)
    # the loaded tree is exactly the model's params tree
    abstract = nn.meta.unbox(llama.random_params(cfg))
    assert jax_structure(params) == jax_structure(abstract)
    stats = llama.main(["--hf", str(tmp_path), "--steps", "3", "--prompt-ids", "1,2,3", "--group-size", "32"])
    assert stats["logit_cosine"] > 0.9
    scaled = llama.rope_frequencies(cfg)
    plain = llama.rope_frequencies(llama.Config(**{**cfg.__dict__, "rope_scaling": None}))
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 8)  # high freq kept, low freq / factor


def _reference_logits(tensors: dict, hf: dict, tokens: np.ndarray) -> np.ndarray:
    """float64 numpy forward pass of a Hugging Face Llama checkpoint (separate q/k/v and
    gate/up matrices, [out, in] as HF stores them): the model's math written out directly."""
    g = lambda name: np.asarray(tensors[name], np.float64)  # noqa: E731
    dim, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd, t, eps = dim // heads, len(tokens), hf["rms_norm_eps"]
    inv = llama.rope_frequencies(llama.config_from_hf(hf))
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(v):  # [T, n, hd], rotate-half
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * w

    x = g("model.embed_tokens.weight")[tokens]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, g(p + "input_layernorm.weight"))
        q = rope((h @ g(p + "self_attn.q_proj.weight").T).reshape(t, heads, hd))
        k = rope((h @ g(p + "self_attn.k_proj.weight").T).reshape(t, kv, hd))
        v = (h @ g(p + "self_attn.v_proj.weight").T).reshape(t, kv, hd)
        out = np.zeros((t, heads, hd))
        for head in range(heads):
            s = q[:, head] @ k[:, head // (heads // kv)].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // (heads // kv)]
        x = x + out.reshape(t, dim) @ g(p + "self_attn.o_proj.weight").T
        h = rms(x, g(p + "post_attention_layernorm.weight"))
        gate, up = h @ g(p + "mlp.gate_proj.weight").T, h @ g(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g(p + "mlp.down_proj.weight").T
    return rms(x, g("model.norm.weight")) @ g("lm_head.weight").T


def test_fused_model_matches_hf_reference(tmp_path, rng):
    """load_hf's fused qkv / gate_up layouts and Block's split of them compute exactly the
    unfused Hugging Face model (float32 model vs float64 numpy)."""
    hf = {"vocab_size": 80, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
          "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    # bf16-representable values, so the loader's bf16 copy is exact
    r = lambda *s: np.asarray(jnp.asarray(rng.standard_normal(s) * 0.2, jnp.bfloat16), np.float32)  # noqa: E731
    tensors = hf_llama_tensors(r, vocab=80, dim=64, kv_dim=16, hidden=96)
    tensors = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in tensors.items()}
    llama.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    cfg, params = llama.load_hf(str(tmp_path))
    assert params["layers_0"]["qkv"]["kernel"].shape == (64, 2 * (4 + 2) * 8)
    assert params["layers_0"]["gate_up"]["kernel"].shape == (64, 2 * 96)
    # the documented feature orders: qkv [kv_heads, group + 2, head_dim], gate_up [hidden / 8, 2, 8]
    group, hd = 4, 8
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = np.asarray(params[f"layers_{i}"]["qkv"]["kernel"], np.float32).reshape(64, 2, group + 2, hd)
        for j in range(2):  # KV head j: query heads j * group .. (j + 1) * group - 1, key head j, value head j
            np.testing.assert_array_equal(qkv[:, j, :group].reshape(64, -1),
                                          tensors[p + "self_attn.q_proj.weight"][j * group * hd:(j + 1) * group * hd].T)
            np.testing.assert_array_equal(qkv[:, j, group], tensors[p + "self_attn.k_proj.weight"][j * hd:(j + 1) * hd].T)
            np.testing.assert_array_equal(qkv[:, j, group + 1], tensors[p + "self_attn.v_proj.weight"][j * hd:(j + 1) * hd].T)
        gate_up = np.asarray(params[f"layers_{i}"]["gate_up"]["kernel"], np.float32).reshape(64, 96 // 8, 2, 8)
        np.testing.assert_array_equal(gate_up[:, :, 0].reshape(64, 96), tensors[p + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(gate_up[:, :, 1].reshape(64, 96), tensors[p + "mlp.up_proj.weight"].T)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    tokens = rng.integers(0, 80, 7).astype(np.int32)
    cache = llama.init_cache(cfg, 1, len(tokens), jnp.float32)  # float32 KV cache too
    with jax.default_matmul_precision("highest"):  # float32 dots, not TF32 (XLA's default on NVIDIA GPUs)
        logits, _ = llama.Llama(cfg, dtype=jnp.float32).apply({"params": params}, jnp.asarray(tokens[None]), cache, 0)
    logits = np.asarray(logits[0])
    ref = _reference_logits(tensors, hf, tokens)
    assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) < 1e-4


def jax_structure(tree):
    import jax

    return jax.tree.structure(jax.tree.map(lambda a: (a.shape, a.dtype), tree))


def test_tp_inference_matches_single_device():
    out = tp_inference.main([])
    assert out["max_rel_diff"] < 1e-5 and out["top1"] == 1.0
    # the fused qkv / gate_up feature orders keep each device's heads and gate/up pairs local:
    # the only communication is the all-reduce of each row-parallel layer (o, down)
    assert out["collectives"] == {"all-reduce": 2 * llama.CONFIGS["tiny"].layers}
    # gate_up [512, 2048] splits N 4 ways: 32 of 128 N-blocks; down [1024, 512] splits K: 1 of 4 K-blocks
    assert out["up_shard"] == (2, 32, 512) and out["down_shard"] == (1, 32, 512)


def test_init_params_layer_by_layer():
    # the same tree (structure, shapes, dtypes) as Llama.init, quantized inside the init program,
    # every leaf where the logical rules put it, and fresh random values per layer
    cfg = llama.CONFIGS["tiny"]
    quant = dict(bits=3, group_size=128, table="nf")
    model = llama.Llama(cfg, quant=quant)
    reference = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                                                llama.init_cache(cfg, 1, 1), 0)["params"]))
    mesh = tp_inference.make_mesh(jax.devices("cpu"), 2, 4)
    params = llama.init_params(cfg, 7, quant, mesh=mesh, rules=tp_inference.RULES)
    assert jax_structure(params) == jax_structure(reference)
    qkv0, qkv1 = params["layers_0"]["qkv"]["kernel"], params["layers_1"]["qkv"]["kernel"]
    assert isinstance(qkv0, fj.QuantizedWeight) and (qkv0.bits, qkv0.group_size) == (3, 128)
    assert not np.array_equal(np.asarray(qkv0.codes), np.asarray(qkv1.codes))
    assert params["layers_0"]["down"]["kernel"].codes.sharding.spec == jax.sharding.PartitionSpec("model", None, None)
    assert qkv0.codes.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    tp_inference.check_shard_specs(params, mesh)
    # the quantized layer is the quantization of what its kernel_init drew: dequantized, it is
    # close to a lecun-normal kernel (std 1/sqrt(fan_in)), not to zeros or a constant
    w = np.asarray(fj.dequantize(params["layers_0"]["gate_up"]["kernel"], jnp.float32))
    assert abs(w.std() * np.sqrt(cfg.dim) - 1) < 0.1


def test_tp_inference_bench_runs():
    # the GPU benchmark's code path (tokens/s at TP 1 and 2, quantized and bf16) on simulated CPUs
    out = tp_inference.main(["--tp", "2", "--data", "1", "--no-check", "--bench", "--bench-tp", "1,2",
                             "--bench-batches", "2", "--context", "4", "--bench-steps", "2", "--attention", "xla"])
    rows = {(r["variant"], r["tp"]): r for r in out["bench"]}
    assert set(rows) == {("4bit-g64", 1), ("4bit-g64", 2), ("bf16", 1), ("bf16", 2)}
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 2 for r in rows.values())
    assert rows[("bf16", 2)]["speedup_vs_bf16"] == 1.0 and rows[("4bit-g64", 2)]["speedup_vs_bf16"] > 0


@pytest.mark.parametrize("script", ["quickstart.py"])
def test_runs_as_a_script(script):
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernel vs float64" in done.stdout
