"""Tests of kvattn/models/llama.py and examples/llama.py on small random checkpoints
in the Hugging Face layouts of Llama (GQA, RoPE with llama3 scaling, untied,
sharded into two files with an index) and Qwen2 (q/k/v biases, tied
embeddings, one file).

The oracle is a float64 numpy forward written here from the Hugging Face
definitions (names, `[out, in]` weights, RMSNorm, SwiGLU, half-split RoPE,
Llama 3.1's frequency rule written out per frequency in tests/reference.py);
it shares no code with the package.

Shape legend: T tokens, DM model width, N query heads, K kv heads, H head dim,
F MLP width, V vocabulary.
"""

import json
import pathlib
import re
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from kvattn import models
from kvattn import rope
from kvattn import sampling
from kvattn.models import checkpoint
from kvattn.models import llama
from kvattn.models import loaders
from kvattn.models import runner
from kvattn.models import transformer
from tests import reference

REPO = pathlib.Path(__file__).absolute().parents[1]

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
    "eos_token_id": [62, 63],
    "bos_token_id": 1,
    # A small original length, so that all three bands of the rule occur at H = 8.
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16
    },
}
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32,
    "max_position_embeddings": 64,
    "eos_token_id": 63,
    "rope_scaling": None,
}
# Mistral: Llama's layout with a sliding window, much shorter than the tests' sequences.
MISTRAL = {
    **LLAMA, "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "sliding_window": 5,
    "rope_scaling": None,
    "rope_theta": 10000.0
}
# Qwen2 with its window on the layers from max_window_layers on: layer 0 global, layer 1 local.
QWEN2_WINDOWED = {**QWEN2, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2, "mistral": MISTRAL, "qwen2_windowed": QWEN2_WINDOWED}


def _random_weights(hf, seed=0):
  """Tensors with the Hugging Face names and shapes, float32."""
  rng = np.random.default_rng(seed)
  dm, v, f = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  n, kh = hf["num_attention_heads"], hf["num_key_value_heads"]
  h = hf.get("head_dim") or dm // n
  qwen2 = hf["model_type"] == "qwen2"

  def normal(*shape, std=0.2):
    return (rng.standard_normal(shape) * std).astype(np.float32)

  w = {"model.embed_tokens.weight": normal(v, dm, std=1.0), "model.norm.weight": 1 + normal(dm)}
  if not hf["tie_word_embeddings"]:
    w["lm_head.weight"] = normal(v, dm)
  for i in range(hf["num_hidden_layers"]):
    pre = f"model.layers.{i}."
    w.update({
        pre + "input_layernorm.weight": 1 + normal(dm),
        pre + "self_attn.q_proj.weight": normal(n * h, dm, std=0.4),
        pre + "self_attn.k_proj.weight": normal(kh * h, dm, std=0.4),
        pre + "self_attn.v_proj.weight": normal(kh * h, dm),
        pre + "self_attn.o_proj.weight": normal(dm, n * h),
        pre + "post_attention_layernorm.weight": 1 + normal(dm),
        pre + "mlp.gate_proj.weight": normal(f, dm),
        pre + "mlp.up_proj.weight": normal(f, dm),
        pre + "mlp.down_proj.weight": normal(dm, f),
    })
    if qwen2:
      w.update({
          pre + "self_attn.q_proj.bias": normal(n * h),
          pre + "self_attn.k_proj.bias": normal(kh * h),
          pre + "self_attn.v_proj.bias": normal(kh * h)
      })
  return w


def _write_checkpoint(directory, hf, weights, shards=1, dtype=np.float32):
  """One model.safetensors, or `shards` files and model.safetensors.index.json."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  weights = {name: a.astype(dtype) for name, a in weights.items()}
  if shards == 1:
    save_file(weights, str(directory / "model.safetensors"))
  else:
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {name: weights[name] for name in names[s::shards]}
      save_file(part, str(directory / file))
      weight_map.update({name: file for name in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({
            "metadata": {},
            "weight_map": weight_map
        }))
  (directory / "config.json").write_text(json.dumps(hf))
  return directory


def numpy_llama(hf, w, ids):
  """Float64 logits [T, V] of one sequence of token ids [T] (Llama or Qwen2)."""
  w = {k: np.asarray(a, np.float64) for k, a in w.items()}
  dm, n, kh = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  h = hf.get("head_dim") or dm // n
  eps, t = hf["rms_norm_eps"], len(ids)
  inv_freq = reference.rope_frequencies(h, hf["rope_theta"], hf.get("rope_scaling"))
  angle = np.arange(t)[:, None] * inv_freq[None]  # [T, H/2]
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

  def rms_norm(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  def linear(x, name):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y

  def rotate(x):  # [T, heads, H], rotate_half as in transformers.
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return x * np.concatenate([cos, cos], -1) + np.concatenate([-x2, x1], -1) * np.concatenate(
        [sin, sin], -1)

  x = w["model.embed_tokens.weight"][ids]
  for i in range(hf["num_hidden_layers"]):
    pre = f"model.layers.{i}."
    a = rms_norm(x, w[pre + "input_layernorm.weight"])
    q = rotate(linear(a, pre + "self_attn.q_proj").reshape(t, n, h))
    k = rotate(linear(a, pre + "self_attn.k_proj").reshape(t, kh, h))
    v = linear(a, pre + "self_attn.v_proj").reshape(t, kh, h)
    k, v = np.repeat(k, n // kh, axis=1), np.repeat(v, n // kh, axis=1)
    scores = np.einsum("inh,jnh->nij", q, k) / np.sqrt(h)
    allowed = np.tril(np.ones((t, t), bool))
    windowed = (hf["model_type"] == "mistral"
                or (hf.get("use_sliding_window") and i >= hf.get("max_window_layers", 0)))
    if windowed and hf.get("sliding_window"):
      allowed &= ~np.tril(np.ones((t, t), bool), -hf["sliding_window"])
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("nij,jnh->inh", probs, v).reshape(t, n * h)
    x = x + linear(o, pre + "self_attn.o_proj")
    m = rms_norm(x, w[pre + "post_attention_layernorm.weight"])
    gate = linear(m, pre + "mlp.gate_proj")
    x = x + linear(gate /
                   (1 + np.exp(-gate)) * linear(m, pre + "mlp.up_proj"), pre + "mlp.down_proj")
  x = rms_norm(x, w["model.norm.weight"])
  unembed = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ unembed.T


def _assert_close(got, want, rel=1e-4):
  """Within rel of the largest logit, elementwise: relative error at the logits' scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.max(np.abs(want)))


@pytest.mark.parametrize("name, shards", [("llama", 2), ("qwen2", 1), ("mistral", 1),
                                          ("qwen2_windowed", 1)])
def test_logits_match_float64_numpy(tmp_path, name, shards):
  hf = CONFIGS[name]
  weights = _random_weights(hf)
  params, config, _ = llama.load(_write_checkpoint(tmp_path, hf, weights, shards=shards))
  ids = np.random.default_rng(1).integers(0, hf["vocab_size"], 24)  # Past the original 16.
  want = numpy_llama(hf, weights, ids)
  assert np.std(want) > 1.0  # Not a degenerate model: the comparison means something.

  logits = jax.jit(transformer.forward, static_argnames="config")(params,
                                                                  jnp.asarray(ids[None], jnp.int32),
                                                                  config=config)
  _assert_close(logits[0], want)

  # Cached: a prefill of 13 tokens, then single-token steps.
  step = jax.jit(transformer.step, static_argnames="config")
  caches = transformer.init_caches(config, 1, 32)
  got, caches = step(params, caches, jnp.asarray(ids[None, :13], jnp.int32), None, config=config)
  outs = [got[0]]
  for i in range(13, 24):
    got, caches = step(params, caches, jnp.asarray(ids[None, i:i + 1], jnp.int32), None,
                       config=config)
    outs.append(got[0])
  _assert_close(jnp.concatenate(outs), want)


def test_the_scaling_matters():
  """Without llama3 scaling the reference logits differ: the test above can fail."""
  weights = _random_weights(LLAMA)
  ids = np.arange(24) % LLAMA["vocab_size"]
  plain = numpy_llama({**LLAMA, "rope_scaling": None}, weights, ids)
  with pytest.raises(AssertionError):
    _assert_close(plain, numpy_llama(LLAMA, weights, ids))


def test_bfloat16_checkpoint_loads_as_float32_or_bfloat16(tmp_path):
  weights = _random_weights(QWEN2, seed=4)
  directory = _write_checkpoint(tmp_path, QWEN2, weights, dtype=ml_dtypes.bfloat16)
  params32, config, _ = llama.load(directory)
  params16, _, _ = llama.load(directory, dtype=ml_dtypes.bfloat16)
  assert params32["embed"].dtype == np.float32
  assert params16["embed"].dtype == ml_dtypes.bfloat16
  rounded = {k: a.astype(ml_dtypes.bfloat16).astype(np.float32) for k, a in weights.items()}
  ids = np.arange(10) % QWEN2["vocab_size"]
  logits = transformer.forward(params32, jnp.asarray(ids[None], jnp.int32), config=config)
  _assert_close(logits[0], numpy_llama(QWEN2, rounded, ids))


@pytest.mark.parametrize("stored, wanted", [(np.float32, np.float32),
                                            (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
                                            (ml_dtypes.bfloat16, np.float32)])
def test_load_maps_the_file_and_copies_each_tensor_once(tmp_path, stored, wanted):
  """Issue 19: the only allocation while loading is the params themselves.

  The files are memory-mapped; each tensor is copied once, straight into its
  place (transposed, stacked, cast). Before, safetensors' reader, the
  transposes and the stacking made up to 2.3x the params' bytes.
  """
  hf = {
      **LLAMA, "hidden_size": 128,
      "intermediate_size": 256,
      "num_attention_heads": 8,
      "num_key_value_heads": 4,
      "head_dim": 16,
      "vocab_size": 512,
      "num_hidden_layers": 4
  }
  weights = _random_weights(hf, seed=5)
  directory = _write_checkpoint(tmp_path, hf, weights, shards=2, dtype=stored)
  tracemalloc.start()
  try:
    params, _, _ = llama.load(directory, dtype=wanted)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  size = sum(a.nbytes for a in jax.tree.leaves(params))
  assert peak <= 1.05 * size + (64 << 10), (peak, size)
  assert all(a.dtype == np.dtype(wanted) and a.flags.writeable and a.flags.c_contiguous
             for a in jax.tree.leaves(params))
  # The same numbers as the tensors, through their layout.
  q = weights["model.layers.2.self_attn.q_proj.weight"].astype(stored).astype(wanted)
  np.testing.assert_array_equal(params["layers"]["attn"]["wq"][2], q.T.reshape(128, 8, 16))


def test_a_damaged_safetensors_file_is_refused(tmp_path):
  directory = _write_checkpoint(tmp_path, LLAMA, _random_weights(LLAMA))
  path = directory / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # Cut short: offsets past the end.
  with pytest.raises(ValueError, match="within the file"):
    llama.load(directory)
  path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
  with pytest.raises(ValueError, match="is not a safetensors file"):
    llama.load(directory)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen2_windowed"])
@pytest.mark.slow
def test_cached_greedy_equals_uncached(tmp_path, name):
  hf = CONFIGS[name]
  weights = _random_weights(hf, seed=2)
  params, config, _ = llama.load(_write_checkpoint(tmp_path, hf, weights))
  prompt = [3, 14, 15, 9, 26]
  ids, _ = runner.generate_ids(params, config, prompt, max_new_tokens=8, sampler=sampling.Sampler(),
                               eos_id=hf["eos_token_id"])
  np.testing.assert_array_equal(ids, _greedy_numpy(hf, weights, prompt, 8))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen2_windowed"])
@pytest.mark.slow
def test_gradient_through_forward_matches_float64_finite_differences(name):
  """jax.grad of a loss through `transformer.forward`, under jit, against the numpy model.

  The weights map linearly onto params, so the derivative along a random
  direction of the Hugging Face tensors is the gradient dotted with that
  direction mapped onto params; the reference is a float64 central difference.
  """
  hf = CONFIGS[name]
  config = llama.config_from_hf(hf)
  weights = _random_weights(hf, seed=6)
  direction = _random_weights(hf, seed=7)
  ids = np.random.default_rng(8).integers(0, hf["vocab_size"], 20)
  cotangent = np.random.default_rng(9).standard_normal((20, hf["vocab_size"]))

  def loss(params):
    logits = transformer.forward(params, jnp.asarray(ids[None], jnp.int32), config=config,
                                 block_size=8)  # Three blocks: the blockwise backward.
    return jnp.sum(logits[0] * jnp.asarray(cotangent, jnp.float32))

  grads = jax.jit(jax.grad(loss))(llama.params_from_hf(weights, config))
  along = llama.params_from_hf(direction, config)
  got = sum(
      float(jnp.vdot(g, jnp.asarray(d)))
      for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(along)))

  def numpy_loss(eps):
    moved = {k: np.float64(a) + eps * np.float64(direction[k]) for k, a in weights.items()}
    return np.sum(numpy_llama(hf, moved, ids) * cotangent)

  eps = 1e-4
  want = (numpy_loss(eps) - numpy_loss(-eps)) / (2 * eps)
  assert abs(want) > 1.0
  np.testing.assert_allclose(got, want, rtol=2e-4)


def _greedy_numpy(hf, weights, prompt, max_new_tokens):
  """Greedy continuation by the float64 numpy forward, recomputing everything each step."""
  seq = list(prompt)
  for _ in range(max_new_tokens):
    seq.append(int(np.argmax(numpy_llama(hf, weights, np.array(seq))[-1])))
    if seq[-1] in np.atleast_1d(hf["eos_token_id"]):
      break
  return seq[len(prompt):]


def test_config_mapping():
  config = llama.config_from_hf(LLAMA)
  assert config == transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                                      num_kv_heads=2, head_dim=8, d_ff=48, max_positions=0,
                                      rope_base=500000.0, tie_embeddings=False, activation="silu",
                                      use_bias=False, norm_eps=1e-5, norm="rms_norm",
                                      gated_mlp=True, qkv_bias=False,
                                      rope_scaling=rope.Scaling("llama3", 8.0, 1.0, 4.0, 16))
  qwen = llama.config_from_hf(QWEN2)
  assert (qwen.qkv_bias, qwen.use_bias, qwen.tie_embeddings, qwen.head_dim,
          qwen.rope_scaling) == (True, False, True, 8, None)
  assert llama.config_from_hf(QWEN2_WINDOWED).window_pattern == (None, 5)
  # As transformers: layer_types first, then max_window_layers (default 28).
  typed = {**QWEN2_WINDOWED, "layer_types": ["sliding_attention", "full_attention"]}
  assert llama.config_from_hf(typed).window_pattern == (5, None)
  no_first = {k: val for k, val in QWEN2_WINDOWED.items() if k != "max_window_layers"}
  assert llama.config_from_hf(no_first).window_pattern == ()  # Layers 0, 1 < 28: global.
  assert llama.config_from_hf({**LLAMA, "sliding_window": 5}).window_pattern == ()
  assert llama.config_from_hf(MISTRAL).window_pattern == (5,)
  linear = llama.config_from_hf({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert linear.rope_scaling == rope.Scaling("linear", 2.0)
  # transformers >= 5 writes theta and scaling into rope_parameters.
  v5 = {k: val for k, val in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {**LLAMA["rope_scaling"], "rope_theta": 500000.0}
  assert llama.config_from_hf(v5) == config


@pytest.mark.parametrize("change, match", [
    ({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2"
    }, r"config.json: llama.load takes architectures \['LlamaForCausalLM', 'MistralForCausalLM', "
     r"'Olmo2ForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\] \(model_type \['llama', "
     r"'mistral', 'olmo2', 'qwen2', 'qwen3'\]\): but got architectures \['GPT2LMHeadModel'\] and "
     r"model_type 'gpt2'; kvattn.models.load"),
    ({
        "hidden_act": "gelu"
    }, r"hidden_act should be 'silu': but got 'gelu'"),
    ({
        "rope_scaling": {
            "rope_type": "dynamic",
            "factor": 4.0
        }
    }, r"rope_scaling type 'dynamic' is not supported"),
    ({
        "partial_rotary_factor": 0.5
    }, r"partial_rotary_factor should be 1 for LlamaForCausalLM: but got 0.5"),
])
def test_unsupported_configs_are_refused(change, match):
  base = LLAMA
  with pytest.raises(ValueError, match=match):
    llama.config_from_hf({**base, **change})


@pytest.mark.parametrize("hf, key", [(MISTRAL, "attention_bias"), (MISTRAL, "mlp_bias"),
                                     (QWEN2, "attention_bias"), (QWEN2, "mlp_bias")])
def test_bias_options_a_class_lacks_are_refused(hf, key):
  """Mistral's and Qwen2's transformers models have no such option: it would be ignored there."""
  name = hf["architectures"][0]
  with pytest.raises(
      ValueError, match=f"config.json: {key} should be false for {name}: but got "
      f"True \\(its transformers model has no such biases"):
    llama.config_from_hf({**hf, key: True})
  assert llama.config_from_hf({**LLAMA, key: True}).use_bias  # Llama has both.


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen2_windowed"])
def test_a_config_without_architectures_is_read_by_its_model_type(name):
  """Issue 20, item 10: as transformers' Auto classes, model_type names the family."""
  hf = CONFIGS[name]
  bare = {k: v for k, v in hf.items() if k != "architectures"}
  assert llama.config_from_hf(bare) == llama.config_from_hf(hf)
  # An architecture the loader does not take (a head for classification) falls back too.
  head = hf["architectures"][0].replace("CausalLM", "TokenClassification")
  other = {**hf, "architectures": [head]}
  assert llama.config_from_hf(other) == llama.config_from_hf(hf)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_models_load_picks_the_llama_loader(tmp_path, name):
  """Issue 20, item 10: `kvattn.models.load` reads config.json and gives what llama.load does."""
  hf = CONFIGS[name]
  directory = _write_checkpoint(tmp_path, {
      k: v for k, v in hf.items() if k != "architectures"
  }, _random_weights(hf, seed=10), dtype=ml_dtypes.bfloat16)
  assert loaders.family(hf).load is llama.load
  for dtype in (np.float32, ml_dtypes.bfloat16):
    params, config, got_hf = models.load(directory, dtype=dtype)
    want, want_config, _ = llama.load(directory, dtype=dtype)
    assert config == want_config == llama.config_from_hf(hf) and got_hf["model_type"] == name
    assert all(a.dtype == np.dtype(dtype) for a in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, want)


@pytest.mark.parametrize("hf, found", [
    ({
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert"
    }, r"architectures \['BertForMaskedLM'\] and model_type 'bert'"),
    ({
        "model_type": "phi3small"
    }, r"architectures \[\] and model_type 'phi3small'"),
    ({}, r"architectures \[\] and model_type None"),
])
def test_models_load_refuses_a_family_it_has_no_loader_for(tmp_path, hf, found):
  (tmp_path / "config.json").write_text(json.dumps(hf))
  model_types = {t: c for row in loaders.FAMILIES for t, c in row.model_types.items()}
  assert {"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gpt2"} <= set(model_types)
  match = (re.escape(f"config.json: kvattn.models.load takes architectures "
                     f"{sorted(set(model_types.values()))} (model_type {sorted(model_types)}): "
                     f"but got ") + found + "$")
  with pytest.raises(ValueError, match=match):
    models.load(tmp_path)


def test_eos_ids_are_those_of_config_and_generation_config(tmp_path):
  """Issue 20, item 5: generation_config.json's ids (an instruct model's end of turn) count."""
  assert checkpoint.eos_ids({"eos_token_id": 2}) == [2]
  assert checkpoint.eos_ids({"eos_token_id": [1, 2]}, {"eos_token_id": [7, 2]}) == [7, 2, 1]
  assert checkpoint.eos_ids({}, {"eos_token_id": 9}) == [9]
  assert checkpoint.eos_ids({"bos_token_id": 1}, {}) == []
  assert checkpoint.read_generation_config(tmp_path) == {}
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
  assert checkpoint.read_generation_config(tmp_path) == {"eos_token_id": [5, 6]}


def test_missing_or_misshapen_tensors_are_named(tmp_path):
  config = llama.config_from_hf(QWEN2)
  weights = _random_weights(QWEN2)
  del weights["model.layers.1.self_attn.k_proj.bias"]
  with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.self_attn.k_proj.bias'"):
    llama.params_from_hf(weights, config)
  weights = _random_weights(QWEN2)
  weights["model.norm.weight"] = weights["model.norm.weight"][:5]
  with pytest.raises(ValueError,
                     match=r"model.norm.weight shape should be \(32,\): but got \(5,\)"):
    llama.params_from_hf(weights, config)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    llama.load(_write_config_only(tmp_path))


def _write_config_only(directory):
  (directory / "config.json").write_text(json.dumps(LLAMA))
  return directory


@pytest.mark.slow
def test_main_runs_both_layouts_with_and_without_a_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  weights = _random_weights(LLAMA, seed=3)
  sharded = _write_checkpoint(tmp_path / "llama", LLAMA, weights, shards=2)
  words = [f"w{i}" for i in range(LLAMA["vocab_size"])]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(sharded / "tokenizer.json"))
  qwen_weights = _random_weights(QWEN2, seed=5)
  single = _write_checkpoint(tmp_path / "qwen2", QWEN2, qwen_weights)

  def main(*flags):
    run = subprocess.run([sys.executable, "examples/llama.py", *flags], cwd=REPO,
                         capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()

  lines = main(f"--checkpoint={sharded}", "--prompt=w3 w14 w15", "--max_new_tokens=6",
               "--print_ids")
  assert lines[0].startswith("w3 w14 w15")
  assert "tokens/s" in lines[-2] and "compile" in lines[-2]
  assert [int(i) for i in lines[-1].split()] == _greedy_numpy(LLAMA, weights, [3, 14, 15], 6)

  lines = main(f"--checkpoint={single}", "--prompt_ids=3,14,15", "--max_new_tokens=5",
               "--print_ids", "--dtype=bfloat16", "--temperature=0.8", "--top_k=5", "--top_p=0.9",
               "--seed=1", "--quantized_cache")
  printed = [int(i) for i in lines[-1].split()]
  assert 1 <= len(printed) <= 5 and all(0 <= i < QWEN2["vocab_size"] for i in printed)


def _run_example(*flags):
  return subprocess.run([sys.executable, "examples/llama.py", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_main_stops_at_the_eos_ids_of_generation_config(tmp_path):
  """Issue 20, item 5: an id that only generation_config.json lists ends generation."""
  weights = _random_weights(LLAMA, seed=3)
  directory = _write_checkpoint(tmp_path, LLAMA, weights)
  greedy = _greedy_numpy(LLAMA, weights, [3, 14, 15], 8)
  # The first token that is new at its place, not the first: generation must stop after it.
  stop = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": greedy[stop]}))
  run = _run_example(f"--checkpoint={directory}", "--prompt_ids=3,14,15", "--max_new_tokens=8",
                     "--print_ids")
  assert run.returncode == 0, run.stderr
  assert [int(i) for i in run.stdout.splitlines()[-1].split()] == greedy[:stop + 1]


@pytest.mark.slow
def test_main_decodes_prompt_and_continuation_together(tmp_path):
  """Issue 20, item 6: a Metaspace (SentencePiece) tokenizer keeps the space between them."""
  from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
  weights = _random_weights(LLAMA, seed=3)
  directory = _write_checkpoint(tmp_path, LLAMA, weights)
  words = [f"\u2581w{i}" for i in range(LLAMA["vocab_size"])]
  tokenizer = Tokenizer(
      tokenizer_models.WordLevel({
          w: i for i, w in enumerate(words)
      }, unk_token=words[0]))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  tokenizer.save(str(directory / "tokenizer.json"))
  greedy = _greedy_numpy(LLAMA, weights, [3, 14, 15], 6)
  want = " ".join(f"w{i}" for i in [3, 14, 15] + greedy)
  # Decoded apart, the space before the first new word is lost: the old output.
  assert tokenizer.decode([3, 14, 15]) + tokenizer.decode(greedy) != want

  run = _run_example(f"--checkpoint={directory}", "--prompt=w3 w14 w15", "--max_new_tokens=6")
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines()[0] == want


@pytest.mark.parametrize("flags, message", [
    (["--prompt_ids=3,abc"
     ], "--prompt_ids should be comma-separated integer token ids: but got 'abc' in '3,abc'"),
    (["--prompt_ids=3,100000"
     ], "--prompt_ids should be token ids in [0, 64) (the model's vocab_size): but got [100000]"),
    (["--prompt_ids=-1,3"
     ], "--prompt_ids should be token ids in [0, 64) (the model's vocab_size): but got [-1]"),
    (["--prompt_ids=3", "--max_new_tokens=0"], "--max_new_tokens should be at least 1: but got 0"),
    (["--prompt_ids=3", "--checkpoint=/no/such/folder"
     ], "--checkpoint should be a checkpoint directory with a config.json: but "
     "/no/such/folder/config.json does not exist"),
    (["--prompt_ids=3", "--checkpoint={bert}"
     ], "config.json: kvattn.models.load takes architectures"),
])
@pytest.mark.slow
def test_main_turns_flag_mistakes_into_usage_errors(tmp_path, flags, message):
  """Issue 20, items 1 and 12: a usage message naming the flag, not a traceback or a silent run.

  An id past the vocabulary would index the embedding out of bounds, which
  jax clamps: the old main generated from a wrong prompt without a word.
  """
  directory = _write_checkpoint(tmp_path / "llama", LLAMA, _random_weights(LLAMA))
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  # The flags after the first two replace them.
  run = _run_example(f"--checkpoint={directory}", "--max_new_tokens=2",
                     *(f.format(bert=bert) for f in flags))
  assert run.returncode == 1, (run.stdout, run.stderr)
  assert "Traceback" not in run.stderr, run.stderr
  assert message in run.stderr, run.stderr


@pytest.mark.slow
def test_quantized_caches_hold_int8_and_keep_the_greedy_tokens(tmp_path, monkeypatch):
  """Issue 20, item 10: `generate_ids(..., quantized_cache=True)` runs on int8 caches."""
  weights = _random_weights(LLAMA, seed=2)
  directory = _write_checkpoint(tmp_path, LLAMA, weights)
  seen = []
  run = runner.run

  def spy(step_fn, params, caches, *args, **kwargs):
    seen.append(caches)
    return run(step_fn, params, caches, *args, **kwargs)

  monkeypatch.setattr(runner, "run", spy)
  prompt = [3, 14, 15, 9, 26]
  params, config, _ = llama.load(directory)
  ids, _ = runner.generate_ids(params, config, prompt, max_new_tokens=8, sampler=sampling.Sampler(),
                               eos_id=LLAMA["eos_token_id"], quantized_cache=True)
  assert seen[0][0].k.dtype == jnp.int8 and seen[0][0].k_scale.dtype == jnp.float32
  np.testing.assert_array_equal(ids, _greedy_numpy(LLAMA, weights, prompt, 8))
  # bfloat16 params with an int8 cache (float32 scales): run by
  # test_main_runs_both_layouts_with_and_without_a_tokenizer (--dtype=bfloat16 --quantized_cache).
