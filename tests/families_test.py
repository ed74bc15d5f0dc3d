"""Tests of the Qwen3 and OLMo 2 loaders (kvattn/models/llama.py) and the Phi-3 loader
(kvattn/models/phi3.py) on small random checkpoints.

The configs, weights and float64 oracle are tests/families.py's (checked against
transformers 5.25), in both spellings of config.json: transformers 5's and the older one
of the Hub checkpoints (`*_v4`, which must map onto the same Config). Phi-3's sequences are
longer than its window (5 tokens), and LongRoPE's (`phi3_longrope`, `phi3_partial`) cross
its original length of 8 tokens.

LongRoPE in a cache follows transformers' per-call rule (`kvattn.rope.Scaling`): each call's
largest position picks the factors for the whole call, and cached keys keep the rotation
of the call that wrote them. `_forward_by_calls` is the oracle of that: tests/families.py's
forward with each call's tokens rotated as that call rotates them.

Shape legend: B batch, T tokens, V vocabulary.
"""

import pathlib
import subprocess
import sys
import tracemalloc
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn import models
from kvattn import rope
from kvattn.models import llama
from kvattn.models import loaders
from kvattn.models import phi3
from kvattn.models import transformer
from tests import families

REPO = pathlib.Path(__file__).absolute().parents[1]
NAMES = ("qwen3", "qwen3_yarn", "phi3", "phi3_longrope", "phi3_partial", "olmo2")
BOTH_SPELLINGS = NAMES + tuple(name + "_v4" for name in NAMES)
LOADERS = {"qwen3": llama.load, "phi3": phi3.load, "olmo2": llama.load}

# One compilation per Config and shape: a `_v4` twin maps onto an equal Config.
_forward = jax.jit(transformer.forward, static_argnames="config")
_step = jax.jit(transformer.step, static_argnames="config")


def _assert_close(got, want, rel=1e-4):
  """Within rel of the largest logit, elementwise: relative error at the logits' scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.max(np.abs(want)))


def _checkpoint(tmp_path, name, seed=0):
  """(hf, weights, directory) of a random checkpoint of FAMILIES[name]."""
  hf = families.FAMILIES[name]
  weights = families.random_weights(hf, seed)
  return hf, weights, families.write_checkpoint(tmp_path / name, hf, weights)


def _forward_by_calls(hf, weights, ids, ends):
  """Float64 logits [T, V] of ids [T] fed in calls ending at `ends` (the last is T).

  The tokens of a call that ends at e are rotated as a forward of e tokens rotates them:
  LongRoPE's long factors where e exceeds the original length. Other RoPE does not depend
  on the call, so this is `families.numpy_forward` for them.
  """
  whole = families.rope_cos_sin

  def by_calls(hf, layer_type, t):
    starts = [0] + list(ends[:-1])
    parts = [[a[start:end] for a in whole(hf, layer_type, end)] for start, end in zip(starts, ends)]
    cos, sin = (np.concatenate(p)[:t] for p in zip(*parts))
    return cos, sin

  with mock.patch.object(families, "rope_cos_sin", by_calls):
    return families.numpy_forward(hf, weights, ids)


@pytest.mark.parametrize("name", BOTH_SPELLINGS)
def test_forward_and_cached_steps_match_float64_numpy(tmp_path, name):
  """A ragged batch: rows of 15 and 12 tokens, each equal to that row alone.

  Cached: a chunk of 6 (the second row 3 real tokens, right-padded), a chunk of 6 that
  takes LongRoPE past its original length in one call (positions 6..11 and 3..8, all with
  the long factors), then three decode steps.
  """
  hf, weights, directory = _checkpoint(tmp_path, name)
  params, config, _ = loaders.load(directory)
  rng = np.random.default_rng(1)
  rows = [rng.integers(0, hf["vocab_size"], 15), rng.integers(0, hf["vocab_size"], 12)]
  whole = [families.numpy_forward(hf, weights, ids) for ids in rows]
  assert min(np.std(w) for w in whole) > 0.5  # Not a degenerate model.

  tokens = np.zeros((2, 15), np.int32)
  mask = np.zeros((2, 15), bool)
  for b, ids in enumerate(rows):
    tokens[b, :len(ids)], mask[b, :len(ids)] = ids, True
  logits = _forward(params, jnp.asarray(tokens), jnp.asarray(mask), config=config)
  for b, ids in enumerate(rows):
    _assert_close(logits[b, :len(ids)], whole[b])
  if name.endswith("_v4"):
    return  # The same Config as its twin (test_config_mapping): the rest is the twin's.

  calls = [(6, 3), (6, 6), (1, 1), (1, 1), (1, 1)]  # Real tokens per call of each row.
  caches = transformer.init_caches(config, 2, 16)
  done, got = [0, 0], [[], []]
  for call in calls:
    width = max(call)
    chunk = np.zeros((2, width), np.int32)
    chunk_mask = np.zeros((2, width), bool)
    for b, count in enumerate(call):
      chunk[b, :count] = rows[b][done[b]:done[b] + count]
      chunk_mask[b, :count] = True
    out, caches = _step(params, caches, jnp.asarray(chunk), jnp.asarray(chunk_mask), config=config)
    for b, count in enumerate(call):
      got[b].append(np.asarray(out[b, :count]))
      done[b] += count
  for b, ids in enumerate(rows):
    ends = np.cumsum([call[b] for call in calls])
    _assert_close(np.concatenate(got[b]), _forward_by_calls(hf, weights, ids, ends))


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_partial"])
def test_longrope_factors_are_chosen_per_call(tmp_path, name):
  """transformers' rule: a call past the original length (8) rotates all its tokens long.

  A prefill of 12 tokens in one call is the uncached forward: long factors throughout. A
  prefill of 6, then decode steps to 12, rotates tokens 0..7 with the short factors (as a
  forward of 8 tokens does) and each later token with the long ones, while the cached keys
  keep their short rotation: what transformers' cached generation computes, which differs
  from the forward of 12 tokens.
  """
  hf, weights, directory = _checkpoint(tmp_path, name)
  params, config, _ = loaders.load(directory)
  ids = np.random.default_rng(2).integers(0, hf["vocab_size"], 12)
  forward = families.numpy_forward(hf, weights, ids)

  caches = transformer.init_caches(config, 1, 12)
  got, _ = _step(params, caches, jnp.asarray(ids[None], jnp.int32), None, config=config)
  _assert_close(got[0], forward)

  got, caches = _step(params, caches, jnp.asarray(ids[None, :6], jnp.int32), None, config=config)
  outs = [got[0]]
  for i in range(6, 12):
    got, caches = _step(params, caches, jnp.asarray(ids[None, i:i + 1], jnp.int32), None,
                        config=config)
    outs.append(got[0])
  outs = jnp.concatenate(outs)
  _assert_close(outs[:8], families.numpy_forward(hf, weights, ids[:8]))
  by_calls = _forward_by_calls(hf, weights, ids, list(range(6, 13)))
  _assert_close(outs, by_calls)
  with pytest.raises(AssertionError):  # The rule matters: not the forward of 12 tokens.
    _assert_close(by_calls[8:], forward[8:])


def _greedy_numpy(hf, weights, prompt, max_new_tokens):
  """Greedy continuation as transformers' cached generate makes it: a prefill, then steps."""
  seq = list(prompt)
  for _ in range(max_new_tokens):
    ends = list(range(len(prompt), len(seq) + 1))
    seq.append(int(np.argmax(_forward_by_calls(hf, weights, np.array(seq), ends)[-1])))
    if seq[-1] == hf["eos_token_id"]:
      break
  return seq[len(prompt):]


def _generate(params, config, prompt, max_new_tokens, eos_id, **kwargs):
  caches = transformer.init_caches(config, 1, 32)
  out = kvattn.generate(transformer.step_fn(config), params, caches, jnp.asarray([prompt],
                                                                                 jnp.int32),
                        max_new_tokens=max_new_tokens, eos_id=eos_id, **kwargs)
  return [int(t) for t in np.asarray(out.tokens)[0, :int(out.lengths[0])]]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_greedy_generate_equals_numpy_greedy(tmp_path, name):
  """Prompts of 6 tokens and 8 new ones: past Phi-3's window and LongRoPE's original length."""
  hf, weights, directory = _checkpoint(tmp_path, name, seed=2)
  params, config, _ = loaders.load(directory)
  prompt = [3, 14, 15, 9, 26, 5]
  assert _generate(params, config, prompt, 8,
                   hf["eos_token_id"]) == _greedy_numpy(hf, weights, prompt, 8)


@pytest.mark.slow
def test_greedy_generate_of_a_prompt_of_the_original_length_unpadded(tmp_path):
  """Prefill at positions 0..7 (short factors, as in transformers), then decode past them."""
  hf, weights, directory = _checkpoint(tmp_path, "phi3_longrope")
  params, config, _ = loaders.load(directory)
  prompt = [int(i) for i in np.random.default_rng(1).integers(0, hf["vocab_size"], 8)]
  assert _generate(params, config, prompt, 4, None,
                   prompt_buckets=None) == _greedy_numpy(hf, weights, prompt, 4)


@pytest.mark.slow
def test_greedy_generate_of_a_prompt_of_the_original_length_bucketed(tmp_path):
  """As above, with the prompt right-padded to generate's bucket of 16 columns: padding
  (position 0 for RoPE) does not count toward LongRoPE's per-call largest position."""
  hf, weights, directory = _checkpoint(tmp_path, "phi3_longrope")
  params, config, _ = loaders.load(directory)
  prompt = [int(i) for i in np.random.default_rng(1).integers(0, hf["vocab_size"], 8)]
  assert _generate(params, config, prompt, 4, None) == _greedy_numpy(hf, weights, prompt, 4)


def test_config_mapping():
  c = llama.config_from_hf(families.QWEN3)
  assert c == transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                                 num_kv_heads=2, head_dim=16, d_ff=48, max_positions=0,
                                 rope_base=1e6, tie_embeddings=True, activation="silu",
                                 use_bias=False, norm_eps=1e-6, norm="rms_norm", gated_mlp=True,
                                 qkv_bias=False, qk_norm="head")
  assert llama.config_from_hf(families.QWEN3_YARN).rope_scaling == rope.Scaling(
      "yarn", 4.0, original_max_positions=1024)
  assert phi3.config_from_hf(families.PHI3) == c._replace(head_dim=8, rope_base=1e4,
                                                          tie_embeddings=False, norm_eps=1e-5,
                                                          qk_norm=None, window_pattern=(5,))
  longrope = phi3.config_from_hf(families.PHI3_LONGROPE)
  # No factor in the config: max_position_embeddings / original, for the attention factor.
  assert (longrope.window_pattern,
          longrope.rope_scaling) == ((),
                                     rope.Scaling("longrope", 8.0, original_max_positions=8,
                                                  short_factor=(1.0, 1.25, 1.5, 2.0),
                                                  long_factor=(1.0, 2.0, 4.0, 8.0)))
  partial = phi3.config_from_hf(families.PHI3_PARTIAL)
  assert (partial.rotary_dim, partial.tie_embeddings) == (4, True)
  assert llama.config_from_hf(families.OLMO2) == c._replace(head_dim=8, rope_base=5e5,
                                                            tie_embeddings=False,
                                                            qk_norm="projection",
                                                            norm_placement="post")
  for name in NAMES:  # The older spelling maps onto the same Config.
    config_from_hf = phi3.config_from_hf if name.startswith("phi3") else llama.config_from_hf
    assert config_from_hf(families.FAMILIES[name + "_v4"]) == config_from_hf(
        families.FAMILIES[name])


def test_config_options_and_defaults():
  """As transformers' configs and models read them."""
  qwen3, olmo2 = families.QWEN3, families.OLMO2
  # attention_bias: q, k, v and o biases (the MLP's absent ones load as zeros).
  biased = llama.config_from_hf({**qwen3, "attention_bias": True})
  assert (biased.qkv_bias, biased.use_bias) == (True, True)
  assert llama.config_from_hf({**olmo2, "attention_bias": True}).qkv_bias
  # Qwen3's window: only with use_sliding_window, from max_window_layers on (default 4096).
  windowed = {**qwen3, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}
  assert llama.config_from_hf(windowed).window_pattern == ()  # layer_types: both "full".
  del windowed["layer_types"]
  assert llama.config_from_hf(windowed).window_pattern == (None, 5)
  del windowed["sliding_window"]
  assert llama.config_from_hf(windowed).window_pattern == (None, 4096)
  assert llama.config_from_hf({**qwen3, "sliding_window": 5}).window_pattern == ()
  # Defaults of keys that are missing: Qwen3Config's head_dim 128 and 32 kv heads, OLMo 2's
  # and Phi-3's rms_norm_eps 1e-5.
  bare = {k: v for k, v in qwen3.items() if k not in ("head_dim", "num_key_value_heads")}
  bare["num_attention_heads"] = 32
  assert (llama.config_from_hf(bare).head_dim, llama.config_from_hf(bare).num_kv_heads) == (128, 32)
  olmo2_eps = {k: v for k, v in olmo2.items() if k != "rms_norm_eps"}
  assert llama.config_from_hf(olmo2_eps).norm_eps == 1e-5
  phi3_eps = {k: v for k, v in families.PHI3.items() if k != "rms_norm_eps"}
  assert phi3.config_from_hf(phi3_eps).norm_eps == 1e-5
  # Phi-3: no window where sliding_window is null; "su" is LongRoPE's older name; the
  # factor in rope_parameters wins over the top-level one.
  assert phi3.config_from_hf({**families.PHI3, "sliding_window": None}).window_pattern == ()
  su = families.FAMILIES["phi3_longrope_v4"]
  su = {**su, "rope_scaling": {**su["rope_scaling"], "type": "su"}}
  assert phi3.config_from_hf(su) == phi3.config_from_hf(families.PHI3_LONGROPE)
  assert phi3.config_from_hf({
      **families.PHI3_PARTIAL, "partial_rotary_factor": 1.0
  }).rotary_dim == 4


def _phi3_scaling(kind):
  return {**families.FAMILIES["phi3_v4"], "rope_scaling": {"type": kind, "factor": 2.0}}


@pytest.mark.parametrize("config_from_hf, hf, match", [
    (llama.config_from_hf, {
        **families.QWEN3, "hidden_act": "gelu"
    }, r"hidden_act should be 'silu': but got 'gelu'"),
    (llama.config_from_hf, {
        **families.QWEN3, "mlp_bias": True
    }, r"mlp_bias should be false for Qwen3ForCausalLM: but got True \(its transformers model has "
     r"no such biases"),
    (llama.config_from_hf, {
        **families.OLMO2, "mlp_bias": True
    }, r"mlp_bias should be false for Olmo2ForCausalLM"),
    (phi3.config_from_hf, {
        **families.PHI3, "attention_bias": True
    }, r"attention_bias should be false for Phi3ForCausalLM"),
    (llama.config_from_hf, {
        **families.QWEN3, "rope_parameters": {
            "rope_type": "dynamic",
            "factor": 2.0,
            "rope_theta": 1e6
        }
    }, r"rope_scaling type 'dynamic' is not supported: its frequencies depend on the longest"),
    (phi3.config_from_hf, _phi3_scaling("linear"),
     r"rope_scaling type should be 'default' or one of \('longrope',\) for Phi3ForCausalLM \(as "
     r"its transformers config validates it\): but got 'linear'"),
    (phi3.config_from_hf, _phi3_scaling("dynamic"), r"'dynamic' is not supported"),
    (llama.config_from_hf, {
        **families.FAMILIES["qwen3_v4"], "partial_rotary_factor": 0.5
    }, r"partial_rotary_factor should be 1 for Qwen3ForCausalLM: but got 0.5 \(read for Phi-3"),
    (phi3.config_from_hf, {
        **families.FAMILIES["phi3_v4"], "partial_rotary_factor": 0.375
    }, r"partial_rotary_factor should leave an even number of rotated features, between 2 and "
     r"head_dim=8: but got 0.375, which gives int\(8 \* 0.375\) = 3"),
    (phi3.config_from_hf, {
        **families.PHI3_PARTIAL, "rope_parameters": {
            **families.PHI3_PARTIAL["rope_parameters"], "short_factor": [1.0] * 4
        }
    }, r"short_factor should have rotary_dim/2 = 2 entries"),
    (phi3.config_from_hf, families.QWEN3,
     r"phi3.load takes architectures \['Phi3ForCausalLM'\] \(model_type \['phi3'\]\): but got "
     r"architectures \['Qwen3ForCausalLM'\]"),
    (llama.config_from_hf, families.PHI3, r"llama.load takes architectures \["),
])
def test_unsupported_configs_are_refused(config_from_hf, hf, match):
  with pytest.raises(ValueError, match=match):
    config_from_hf(hf)


def test_missing_or_misshapen_fused_tensors_are_named():
  hf = families.PHI3
  config = phi3.config_from_hf(hf)
  weights = families.random_weights(hf)
  weights["model.layers.1.self_attn.qkv_proj.weight"] = weights[
      "model.layers.1.self_attn.qkv_proj.weight"][:-1]
  with pytest.raises(
      ValueError, match=r"model.layers.1.self_attn.qkv_proj.weight shape should be "
      r"\(64, 32\): but got \(63, 32\)"):
    phi3.params_from_hf(weights, config)
  weights = families.random_weights(hf)
  del weights["model.layers.0.mlp.gate_up_proj.weight"]
  with pytest.raises(ValueError, match=r"no tensor 'model.layers.0.mlp.gate_up_proj.weight'"):
    phi3.params_from_hf(weights, config)
  weights = families.random_weights(families.OLMO2)
  del weights["model.layers.1.post_feedforward_layernorm.weight"]
  with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.post_feedforward_layernorm"):
    llama.params_from_hf(weights, llama.config_from_hf(families.OLMO2))


def test_phi3_split_copies_each_tensor_once(tmp_path):
  """The fused tensors are split into views of the file: the params are the only copy."""
  hf = {**families.PHI3, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 512}
  weights = families.random_weights(hf)
  directory = families.write_checkpoint(tmp_path, hf, weights)
  tracemalloc.start()
  try:
    params, config, _ = phi3.load(directory)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  size = sum(a.nbytes for a in jax.tree.leaves(params))
  assert peak <= 1.05 * size + (64 << 10), (peak, size)
  h = config.head_dim
  qkv = weights["model.layers.1.self_attn.qkv_proj.weight"]  # Rows q (4 heads) | k | v (2 each).
  np.testing.assert_array_equal(params["layers"]["attn"]["wk"][1],
                                qkv[4 * h:6 * h].T.reshape(128, 2, h))
  gate_up = weights["model.layers.0.mlp.gate_up_proj.weight"]
  np.testing.assert_array_equal(params["layers"]["mlp"]["w_in"][0], gate_up[256:].T)


@pytest.mark.parametrize("name", BOTH_SPELLINGS)
def test_models_load_picks_the_loader(tmp_path, name):
  hf, _, directory = _checkpoint(tmp_path, name)
  want = LOADERS[hf["model_type"]]
  assert loaders.family(hf).load is want
  bare = {k: v for k, v in hf.items() if k != "architectures"}  # Read by its model_type.
  assert loaders.family(bare).load is want
  params, config, got_hf = models.load(directory)
  want_params, want_config, _ = want(directory)
  assert config == want_config and got_hf == hf
  jax.tree.map(np.testing.assert_array_equal, params, want_params)


@pytest.mark.parametrize("name", ["qwen3", "phi3_partial"])
@pytest.mark.slow
def test_example_runs_a_checkpoint(tmp_path, name):
  hf, weights, directory = _checkpoint(tmp_path, name, seed=3)
  run = subprocess.run([
      sys.executable, "examples/llama.py", f"--checkpoint={directory}", "--prompt_ids=1,2,3",
      "--max_new_tokens=4", "--print_ids"
  ], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  assert [int(i) for i in run.stdout.splitlines()[-1].split()
         ] == _greedy_numpy(hf, weights, [1, 2, 3], 4)


def _loader(name):
  return phi3 if name.startswith("phi3") else llama


@pytest.mark.parametrize("name", ["qwen3", "phi3_partial", "olmo2"])
@pytest.mark.slow
def test_gradient_through_forward_matches_float64_finite_differences(name):
  """jax.grad of a loss through `forward` against a float64 central difference of the oracle.

  The params are a linear map of the Hugging Face tensors (a transpose, a
  split of the fused ones), so the derivative along a direction d of the
  tensors is the gradient dotted with params(d).
  """
  hf = families.FAMILIES[name]
  loader = _loader(name)
  config = loader.config_from_hf(hf)
  weights = families.random_weights(hf, seed=6)
  direction = families.random_weights(hf, seed=7)
  ids = np.random.default_rng(8).integers(0, hf["vocab_size"], 12)
  cotangent = np.random.default_rng(9).standard_normal((12, hf["vocab_size"]))

  def loss(params):
    logits = transformer.forward(params, jnp.asarray(ids[None], jnp.int32), config=config,
                                 block_size=4)  # Three blocks: the blockwise backward.
    return jnp.sum(logits[0] * jnp.asarray(cotangent, jnp.float32))

  grads = jax.jit(jax.grad(loss))(loader.params_from_hf(weights, config))
  along = loader.params_from_hf(direction, config, np.float64)
  got = sum(
      float(jnp.vdot(g, jnp.asarray(d, jnp.float32)))
      for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(along)))

  def numpy_loss(eps):
    moved = {k: np.float64(a) + eps * np.float64(direction[k]) for k, a in weights.items()}
    return np.sum(families.numpy_forward(hf, moved, ids) * cotangent)

  eps = 1e-4
  want = (numpy_loss(eps) - numpy_loss(-eps)) / (2 * eps)
  assert abs(want) > 1.0
  np.testing.assert_allclose(got, want, rtol=5e-4)
