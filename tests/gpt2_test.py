"""Tests of kvattn/models/gpt2.py and examples/gpt2.py on a small random checkpoint
in the Hugging Face layout.

The oracle is a float64 numpy GPT-2 forward written here from the GPT-2
definition (fused c_attn, Conv1D weights [in, out], learned positions,
GELU tanh, final LayerNorm, tied unembedding); it shares no code with the
example.

Shape legend: T tokens, DM model width, N heads, H head dim, V vocabulary.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from kvattn import models
from kvattn import sampling
from kvattn.models import gpt2
from kvattn.models import loaders
from kvattn.models import runner
from kvattn.models import transformer

HF_CONFIG = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 40,
    "vocab_size": 50,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "n_inner": None,
    "eos_token_id": 49,
}
REPO = pathlib.Path(__file__).absolute().parents[1]


def _random_weights(seed=0, prefix=""):
  """GPT-2 tensors with the Hugging Face names and shapes, float32."""
  rng = np.random.default_rng(seed)
  dm, v, p = HF_CONFIG["n_embd"], HF_CONFIG["vocab_size"], HF_CONFIG["n_positions"]
  f = 4 * dm

  def normal(*shape, std=0.2):
    return (rng.standard_normal(shape) * std).astype(np.float32)

  w = {
      "wte.weight": normal(v, dm, std=0.5),
      "wpe.weight": normal(p, dm),
      "ln_f.weight": 1 + normal(dm),
      "ln_f.bias": normal(dm)
  }
  for i in range(HF_CONFIG["n_layer"]):
    pre = f"h.{i}."
    w.update({
        pre + "ln_1.weight": 1 + normal(dm),
        pre + "ln_1.bias": normal(dm),
        pre + "attn.c_attn.weight": normal(dm, 3 * dm),
        pre + "attn.c_attn.bias": normal(3 * dm),
        pre + "attn.c_proj.weight": normal(dm, dm),
        pre + "attn.c_proj.bias": normal(dm),
        pre + "ln_2.weight": 1 + normal(dm),
        pre + "ln_2.bias": normal(dm),
        pre + "mlp.c_fc.weight": normal(dm, f),
        pre + "mlp.c_fc.bias": normal(f),
        pre + "mlp.c_proj.weight": normal(f, dm),
        pre + "mlp.c_proj.bias": normal(dm),
        # Older checkpoints carry the causal-mask buffer; the loader ignores it.
        pre + "attn.bias": np.tril(np.ones((p, p), np.float32))[None, None],
    })
  return {prefix + name: a for name, a in w.items()}


def _write_checkpoint(directory, weights):
  save_file(weights, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(HF_CONFIG))
  return directory


def numpy_gpt2(w, ids):
  """Float64 GPT-2 logits [T, V] for one sequence of token ids [T]."""
  w = {k.removeprefix("transformer."): np.asarray(a, np.float64) for k, a in w.items()}
  n, eps = HF_CONFIG["n_head"], HF_CONFIG["layer_norm_epsilon"]
  t = len(ids)

  def layer_norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu)**2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b

  def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  x = w["wte.weight"][ids] + w["wpe.weight"][np.arange(t)]
  for i in range(HF_CONFIG["n_layer"]):
    pre = f"h.{i}."
    a = layer_norm(x, w[pre + "ln_1.weight"], w[pre + "ln_1.bias"])
    qkv = a @ w[pre + "attn.c_attn.weight"] + w[pre + "attn.c_attn.bias"]
    q, k, v = (m.reshape(t, n, -1).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ v).transpose(1, 0, 2).reshape(t, -1)
    x = x + o @ w[pre + "attn.c_proj.weight"] + w[pre + "attn.c_proj.bias"]
    m = layer_norm(x, w[pre + "ln_2.weight"], w[pre + "ln_2.bias"])
    h = gelu_new(m @ w[pre + "mlp.c_fc.weight"] + w[pre + "mlp.c_fc.bias"])
    x = x + h @ w[pre + "mlp.c_proj.weight"] + w[pre + "mlp.c_proj.bias"]
  x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
  return x @ w["wte.weight"].T


def _assert_close(got, want):
  """Within 1e-4 of the largest logit, elementwise: relative error at the logits' scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_logits_match_float64_numpy_gpt2(tmp_path, prefix):
  weights = _random_weights(prefix=prefix)
  params, config, _ = gpt2.load(_write_checkpoint(tmp_path, weights))
  ids = np.random.default_rng(1).integers(0, HF_CONFIG["vocab_size"], 12)
  want = numpy_gpt2(weights, ids)
  assert np.std(want) > 1.0  # Not a degenerate model: the comparison means something.

  logits = jax.jit(transformer.forward, static_argnames="config")(params,
                                                                  jnp.asarray(ids[None], jnp.int32),
                                                                  config=config)
  _assert_close(logits[0], want)

  # Cached: a prefill of 7 tokens, then 5 single-token steps.
  step = jax.jit(transformer.step, static_argnames="config")
  caches = transformer.init_caches(config, 1, 16)
  got, caches = step(params, caches, jnp.asarray(ids[None, :7], jnp.int32), None, config=config)
  outs = [got[0]]
  for i in range(7, 12):
    got, caches = step(params, caches, jnp.asarray(ids[None, i:i + 1], jnp.int32), None,
                       config=config)
    outs.append(got[0])
  _assert_close(jnp.concatenate(outs), want)


@pytest.mark.slow
def test_cached_generation_equals_uncached_greedy(tmp_path):
  weights = _random_weights(seed=2)
  params, config, hf = gpt2.load(_write_checkpoint(tmp_path, weights))
  prompt = [3, 14, 15, 9, 26]
  ids, _ = runner.generate_ids(params, config, prompt, max_new_tokens=10,
                               sampler=sampling.Sampler(), eos_id=hf["eos_token_id"])
  # Uncached: the float64 numpy forward over the whole sequence for each new token.
  np.testing.assert_array_equal(ids, _greedy_numpy(weights, prompt, 10, hf["eos_token_id"]))


def test_config_mapping():
  config = gpt2.config_from_hf(HF_CONFIG)
  assert config == transformer.Config(vocab_size=50, num_layers=2, d_model=32, num_heads=4,
                                      num_kv_heads=4, head_dim=8, d_ff=128, max_positions=40,
                                      rope_base=None, tie_embeddings=True, activation="gelu_tanh",
                                      use_bias=True, norm_eps=1e-5)
  with pytest.raises(ValueError, match="unsupported activation_function 'swish'"):
    gpt2.config_from_hf({**HF_CONFIG, "activation_function": "swish"})


def test_load_takes_a_dtype(tmp_path):
  """Issue 20, item 10: as llama.load, `dtype` is the params' dtype, float32 by default."""
  weights = _random_weights(seed=4)
  directory = _write_checkpoint(tmp_path, weights)
  params32, config, _ = gpt2.load(directory)
  params16, config16, _ = gpt2.load(directory, dtype=ml_dtypes.bfloat16)
  assert config16 == config
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params32))
  assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(params16))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16)),
               params16, params32)
  # The bfloat16 model runs, with bfloat16 caches, near the float64 model of its rounded weights.
  rounded = {k: a.astype(ml_dtypes.bfloat16).astype(np.float64) for k, a in weights.items()}
  ids = np.arange(12) % HF_CONFIG["vocab_size"]
  logits = transformer.forward(jax.device_put(params16), jnp.asarray(ids[None], jnp.int32),
                               config=config)
  want = numpy_gpt2(rounded, ids)
  np.testing.assert_allclose(np.asarray(logits[0], np.float64), want, rtol=0,
                             atol=0.02 * np.max(np.abs(want)))


def test_load_refuses_another_family_and_names_the_loader_that_takes_it(tmp_path):
  """Issue 20, item 12: a Llama folder was `KeyError: 'n_embd'`."""
  llama_config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": 32,
      "num_hidden_layers": 2,
      "vocab_size": 64
  }
  (tmp_path / "config.json").write_text(json.dumps(llama_config))
  match = (r"^config.json: gpt2.load takes architectures \['GPT2LMHeadModel'\] \(model_type "
           r"\['gpt2'\]\): but got architectures \['LlamaForCausalLM'\] and model_type "
           r"'llama'; kvattn.models.load\(directory\) picks the loader that config.json names$")
  with pytest.raises(ValueError, match=match):
    gpt2.load(tmp_path)
  # With `architectures` (as transformers writes it) or without (HF_CONFIG): both GPT-2.
  assert gpt2.config_from_hf({
      **HF_CONFIG, "architectures": ["GPT2LMHeadModel"]
  }) == (gpt2.config_from_hf(HF_CONFIG))


@pytest.mark.parametrize("architectures", [None, ["GPT2LMHeadModel"]])
def test_models_load_picks_the_gpt2_loader(tmp_path, architectures):
  """Issue 20, item 10: `kvattn.models.load` reads config.json and gives what gpt2.load does."""
  hf = HF_CONFIG if architectures is None else {**HF_CONFIG, "architectures": architectures}
  directory = _write_checkpoint(tmp_path, _random_weights(seed=5))
  (directory / "config.json").write_text(json.dumps(hf))
  assert loaders.family(hf).load is gpt2.load
  for dtype in (np.float32, ml_dtypes.bfloat16):
    params, config, got_hf = models.load(directory, dtype=dtype)
    want, want_config, _ = gpt2.load(directory, dtype=dtype)
    assert config == want_config and got_hf == hf
    assert all(a.dtype == np.dtype(dtype) for a in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_missing_or_misshapen_tensors_are_named(tmp_path):
  config = gpt2.config_from_hf(HF_CONFIG)
  weights = _random_weights()
  del weights["h.1.mlp.c_fc.bias"]
  with pytest.raises(ValueError, match=r"no tensor 'h.1.mlp.c_fc.bias'"):
    gpt2.params_from_hf(weights, config)
  weights = _random_weights()
  weights["wpe.weight"] = weights["wpe.weight"][:5]
  match = r"wpe.weight shape should be \(40, 32\): but got \(5, 32\)"
  with pytest.raises(ValueError, match=match):
    gpt2.params_from_hf(weights, config)


def test_prompt_longer_than_the_positions_is_refused(tmp_path):
  params, config, _ = gpt2.load(_write_checkpoint(tmp_path, _random_weights()))
  with pytest.raises(ValueError, match="should fit the model's 40 positions"):
    runner.generate_ids(params, config, [1] * 30, max_new_tokens=12, sampler=sampling.Sampler())


def _greedy_numpy(weights, prompt, max_new_tokens, eos_id):
  """Greedy continuation by the float64 numpy GPT-2, recomputing everything each step."""
  seq = list(prompt)
  for _ in range(max_new_tokens):
    seq.append(int(np.argmax(numpy_gpt2(weights, np.array(seq))[-1])))
    if seq[-1] == eos_id:
      break
  return seq[len(prompt):]


@pytest.mark.slow
def test_main_with_a_tokenizer_prints_text_and_ids(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  weights = _random_weights(seed=3)
  _write_checkpoint(tmp_path, weights)
  words = [f"w{i}" for i in range(HF_CONFIG["vocab_size"])]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(tmp_path / "tokenizer.json"))

  run = subprocess.run([
      sys.executable, "examples/gpt2.py", f"--checkpoint={tmp_path}", "--prompt=w3 w14 w15",
      "--max_new_tokens=6", "--print_ids"
  ], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  assert "tokens/s" in lines[-2] and "compile" in lines[-2]
  printed = [int(i) for i in lines[-1].split()]
  assert printed == _greedy_numpy(weights, [3, 14, 15], 6, HF_CONFIG["eos_token_id"])
  assert lines[0].startswith("w3 w14 w15")
