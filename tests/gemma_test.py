"""Tests of kvattn/models/gemma.py on small random Gemma, Gemma 2 and Gemma 3 checkpoints.

The configs, weights and float64 oracle are tests/families.py's (checked against
transformers 5.25), in both spellings of config.json: transformers 5's and the older
one of the Hub checkpoints (`*_v4`). The sequences are longer than the windows (4
tokens), so Gemma 2's and Gemma 3's local layers, and their ring caches, matter.

Shape legend: B batch, T tokens, V vocabulary.
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

import kvattn
from kvattn import models
from kvattn import rope
from kvattn.models import gemma
from kvattn.models import loaders
from kvattn.models import transformer
from tests import families

REPO = pathlib.Path(__file__).absolute().parents[1]
NAMES = ("gemma", "gemma2", "gemma3")
BOTH_SPELLINGS = NAMES + tuple(name + "_v4" for name in NAMES)

# One compilation per Config and shape: a `_v4` twin maps onto an equal Config.
_forward = jax.jit(transformer.forward, static_argnames="config")
_step = jax.jit(transformer.step, static_argnames="config")


def _assert_close(got, want, rel=1e-4):
  """Within rel of the largest logit, elementwise: relative error at the logits' scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.max(np.abs(want)))


def _checkpoint(directory, name, seed=0):
  hf = families.FAMILIES[name]
  weights = families.random_weights(hf, seed)
  return families.write_checkpoint(directory, hf, weights), hf, weights


def _greedy_numpy(hf, weights, prompt, max_new_tokens):
  """Greedy continuation by the float64 oracle, up to and including an EOS."""
  seq = list(prompt)
  for _ in range(max_new_tokens):
    seq.append(int(np.argmax(families.numpy_forward(hf, weights, np.array(seq))[-1])))
    if seq[-1] == hf["eos_token_id"]:
      break
  return seq[len(prompt):]


_BASE = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=48, head_dim=16, max_positions=0,
             tie_embeddings=True, activation="gelu_tanh", use_bias=False, norm_eps=1e-6,
             norm="rms_norm", gated_mlp=True, qkv_bias=False,
             embed_scale=float(np.float32(32**0.5)))
_GEMMA2 = dict(norm_placement="pre_post", window_pattern=(4, None), attn_softcap=5.0,
               final_softcap=3.0, attn_scale=24**-0.5)
_GEMMA3 = dict(norm_placement="pre_post", window_pattern=(4,) * 5 + (None,), qk_norm="head",
               attn_scale=20**-0.5, rope_local_base=10000.0,
               rope_scaling=rope.Scaling("linear", 8.0))
CONFIGS = {
    "gemma": transformer.Config(num_layers=2, num_kv_heads=1, rope_base=10000.0, **_BASE),
    "gemma2": transformer.Config(num_layers=4, num_kv_heads=2, rope_base=10000.0, **_GEMMA2,
                                 **_BASE),
    "gemma3": transformer.Config(num_layers=6, num_kv_heads=1, rope_base=1e6, **_GEMMA3, **_BASE),
}


@pytest.mark.parametrize("name", BOTH_SPELLINGS)
def test_config_mapping(name):
  assert gemma.config_from_hf(families.FAMILIES[name]) == CONFIGS[name.removesuffix("_v4")]


_DROP = "drop"  # The key is left out of config.json.


@pytest.mark.parametrize(
    "name, change, field, value",
    [
        ("gemma2", dict(attn_logit_softcapping=None), "attn_softcap", None),
        ("gemma2", dict(final_logit_softcapping=None), "final_softcap", None),
        ("gemma2_v4", dict(attn_logit_softcapping=_DROP), "attn_softcap", 50.0),  # Gemma2Config's.
        ("gemma2_v4", dict(final_logit_softcapping=_DROP), "final_softcap", 30.0),
        ("gemma2", dict(query_pre_attn_scalar=_DROP), "attn_scale", 256**-0.5),
        # Gemma 3 ignores attn_logit_softcapping, as transformers 5 does.
        ("gemma3", dict(attn_logit_softcapping=7.0), "attn_softcap", None),
        ("gemma3", dict(final_logit_softcapping=7.0), "final_softcap", 7.0),
        ("gemma", dict(attn_logit_softcapping=7.0, sliding_window=2), "window_pattern", ()),
        ("gemma", dict(hidden_act=_DROP), "activation", "gelu_tanh"),
        ("gemma2", dict(layer_types=_DROP), "window_pattern", (4, None)),  # Even layers local.
        ("gemma3", dict(layer_types=_DROP), "window_pattern", (4,) * 5 + (None,)),  # Default 6.
        ("gemma3_v4", dict(sliding_window_pattern=3, num_hidden_layers=8), "window_pattern",
         (4, 4, None)),  # 8 layers: the pattern of 3 repeated, cut short.
        ("gemma3", dict(layer_types=["sliding_attention"] * 6), "window_pattern", (4,)),
        ("gemma3", dict(layer_types=["full_attention"] * 6), "window_pattern", ()),
        ("gemma3", dict(layer_types=["full_attention"] * 6), "rope_local_base", None),
        ("gemma3_v4", dict(rope_scaling=None), "rope_scaling", None),  # gemma-3-1b.
        ("gemma3_v4", dict(rope_theta=_DROP, rope_local_base_freq=_DROP), "rope_base", 1e6),
        ("gemma3_v4", dict(rope_local_base_freq=500.0), "rope_local_base", 500.0),
        ("gemma2_v4", dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling",
         rope.Scaling("linear", 2.0)),
        ("gemma2", dict(tie_word_embeddings=False), "tie_embeddings", False),
        ("gemma2", dict(attention_bias=True), "qkv_bias", True),
        ("gemma", dict(head_dim=_DROP), "head_dim", 256),
    ])
def test_config_keys_as_transformers_reads_them(name, change, field, value):
  hf = {**families.FAMILIES[name], **change}
  hf = {k: v for k, v in hf.items() if v is not _DROP}
  assert getattr(gemma.config_from_hf(hf), field) == value


@pytest.mark.parametrize("name", BOTH_SPELLINGS)
def test_logits_of_forward_and_cached_step_match_float64_numpy(tmp_path, name):
  """A ragged batch: row 1 is left-padded, and each row equals that row alone.

  Cached: a prefill of two chunks of 5 columns (longer than the window), then
  single-column decode steps, into the per-run caches (ring caches of 4 slots on
  the local layers).
  """
  directory, hf, weights = _checkpoint(tmp_path, name)
  params, config, _ = gemma.load(directory)
  rng = np.random.default_rng(1)
  t, pad = 13, 3
  rows = [rng.integers(0, hf["vocab_size"], t), rng.integers(0, hf["vocab_size"], t - pad)]
  want = [families.numpy_forward(hf, weights, ids) for ids in rows]
  assert min(np.std(w) for w in want) > 0.5  # Not a degenerate model.
  tokens = jnp.asarray(np.stack([rows[0], np.concatenate([np.zeros(pad, int), rows[1]])]),
                       jnp.int32)
  mask = jnp.asarray(np.arange(t)[None] >= np.array([[0], [pad]]))

  def check(logits):
    _assert_close(logits[0], want[0])
    _assert_close(logits[1, pad:], want[1])
    np.testing.assert_array_equal(logits[1, :pad], 0.0)

  check(_forward(params, tokens, mask, config=config))

  caches = transformer.init_caches(config, 2, 16)
  runs = transformer.layer_runs(config)
  assert len(caches) == len(runs)
  assert [c.k.shape[2] for c in caches] == [16 if w is None else w for w, _, _ in runs]
  outs = []
  for lo, hi in [(0, 5), (5, 10)] + [(i, i + 1) for i in range(10, t)]:  # Two shapes.
    logits, caches = _step(params, caches, tokens[:, lo:hi], mask[:, lo:hi], config=config)
    outs.append(logits)
  check(jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("name, change", [
    ("gemma2", {
        "attn_logit_softcapping": None
    }),
    ("gemma2", {
        "final_logit_softcapping": None
    }),
    ("gemma2", {
        "layer_types": ["full_attention"] * 4
    }),
    ("gemma2", {
        "query_pre_attn_scalar": 16
    }),
    ("gemma3_v4", {
        "rope_scaling": None
    }),
    ("gemma3_v4", {
        "rope_local_base_freq": 1e6
    }),
])
def test_the_oracle_sees_each_feature(name, change):
  """Each Gemma feature moves the oracle's logits past the tolerance: the tests above can fail."""
  hf = families.FAMILIES[name]
  weights = families.random_weights(hf)
  ids = np.random.default_rng(1).integers(0, hf["vocab_size"], 13)
  with pytest.raises(AssertionError):
    _assert_close(families.numpy_forward({
        **hf,
        **change
    }, weights, ids), families.numpy_forward(hf, weights, ids))


@pytest.mark.slow
def test_attention_biases_and_untied_unembedding_match_float64_numpy(tmp_path):
  hf = {**families.GEMMA2, "attention_bias": True, "tie_word_embeddings": False}
  weights = families.random_weights(hf, seed=3)
  assert "model.layers.0.self_attn.o_proj.bias" in weights and "lm_head.weight" in weights
  params, config, _ = gemma.load(families.write_checkpoint(tmp_path, hf, weights))
  ids = np.random.default_rng(4).integers(0, hf["vocab_size"], 11)
  logits = _forward(params, jnp.asarray(ids[None], jnp.int32), config=config)
  _assert_close(logits[0], families.numpy_forward(hf, weights, ids))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_generate_greedy_equals_float64_numpy_greedy(tmp_path, name):
  """`kvattn.generate` with `transformer.step_fn`, two prompts (one left-padded) past the window."""
  directory, hf, weights = _checkpoint(tmp_path, name, seed=2)
  params, config, _ = gemma.load(directory)
  prompts = [[3, 14, 15, 9, 26], [5, 35, 8]]
  tokens = np.array([prompts[0], [0, 0] + prompts[1]], np.int32)
  mask = tokens > 0
  out = kvattn.generate(transformer.step_fn(config), params, transformer.init_caches(config, 2, 32),
                        tokens, mask, max_new_tokens=9, eos_id=hf["eos_token_id"])
  for row, prompt in enumerate(prompts):
    got = np.asarray(out.tokens[row, :int(out.lengths[row])])
    np.testing.assert_array_equal(got, _greedy_numpy(hf, weights, prompt, 9))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_gradient_through_forward_matches_float64_finite_differences(name):
  """jax.grad of a loss through `forward` against a float64 central difference of the oracle.

  The params are an affine map of the Hugging Face tensors (linear, plus 1 on
  the norms), so the derivative along a direction d of the tensors is the
  gradient dotted with params(d) - params(0).
  """
  hf = families.FAMILIES[name]
  config = gemma.config_from_hf(hf)
  weights = families.random_weights(hf, seed=6)
  direction = families.random_weights(hf, seed=7)
  ids = np.random.default_rng(8).integers(0, hf["vocab_size"], 12)
  cotangent = np.random.default_rng(9).standard_normal((12, hf["vocab_size"]))

  def loss(params):
    logits = transformer.forward(params, jnp.asarray(ids[None], jnp.int32), config=config,
                                 block_size=4)  # Three blocks: the blockwise backward.
    return jnp.sum(logits[0] * jnp.asarray(cotangent, jnp.float32))

  grads = jax.jit(jax.grad(loss))(gemma.params_from_hf(weights, config))
  zeros = {k: np.zeros_like(a) for k, a in direction.items()}
  along = jax.tree.map(np.subtract, gemma.params_from_hf(direction, config, np.float64),
                       gemma.params_from_hf(zeros, config, np.float64))
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


def test_norm_weights_are_loaded_plus_one_in_float32():
  """Gemma's RMSNorm multiplies by (1 + w): every norm's scale is 1 + w, added in float32."""
  hf = families.GEMMA3
  config = gemma.config_from_hf(hf)
  weights = families.random_weights(hf)
  pre = "model.layers.2."
  names = {
      ("ln1", "scale"): "input_layernorm",
      ("post_ln1", "scale"): "post_attention_layernorm",
      ("ln2", "scale"): "pre_feedforward_layernorm",
      ("post_ln2", "scale"): "post_feedforward_layernorm",
      ("attn", "q_norm"): "self_attn.q_norm",
      ("attn", "k_norm"): "self_attn.k_norm",
  }
  for dtype in (np.float32, ml_dtypes.bfloat16):
    params = gemma.params_from_hf(weights, config, dtype)
    assert all(a.dtype == np.dtype(dtype) for a in jax.tree.leaves(params))
    for (group, leaf), name in names.items():
      np.testing.assert_array_equal(params["layers"][group][leaf][2],
                                    (1 + weights[f"{pre}{name}.weight"]).astype(dtype))
    np.testing.assert_array_equal(params["ln_f"]["scale"],
                                  (1 + weights["model.norm.weight"]).astype(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_models_load_picks_the_gemma_loader(tmp_path, name):
  directory, hf, _ = _checkpoint(tmp_path, name)
  assert loaders.family(hf).load is gemma.load
  params, config, got_hf = models.load(directory)
  want, want_config, _ = gemma.load(directory)
  assert config == want_config == gemma.config_from_hf(hf) and got_hf == hf
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_multimodal_gemma3_is_refused(tmp_path):
  hf = {
      "architectures": ["Gemma3ForConditionalGeneration"],
      "model_type": "gemma3",
      "text_config": {
          **families.GEMMA3, "model_type": "gemma3_text"
      },
      "vision_config": {
          "model_type": "siglip_vision_model"
      }
  }
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(
      ValueError, match=r"kvattn.models.load takes architectures .*'Gemma3ForCausal"
      r"LM'.*: but got architectures \['Gemma3ForConditionalGeneration'\] and "
      r"model_type 'gemma3'$"):
    models.load(tmp_path)
  with pytest.raises(
      ValueError, match=r"gemma.load takes the text-only Gemma3ForCausalLM .* "
      r"the multimodal Gemma 3"):
    gemma.load(tmp_path)


_LOCAL_LINEAR = dict(full_attention=dict(rope_type="default", rope_theta=1e6),
                     sliding_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e4))


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("gemma2", dict(use_bidirectional_attention=True),
         r"use_bidirectional_attention should be false or absent: but got True "
         r"\(kvattn's attention is causal\)"),
        ("gemma3", dict(use_bidirectional_attention=True), r"use_bidirectional_attention"),
        ("gemma", dict(hidden_act="relu"),
         r"hidden_act should be tanh GELU, Gemma's activation \(one of .*'gelu'\)\): "
         r"but got 'relu'"),
        (
            "gemma2",
            dict(hidden_activation="gelu"),  # Exact GELU, in Gemma 2 and 3.
            r"hidden_activation should be tanh GELU.*'gelu_pytorch_tanh'.*: but got 'gelu'"),
        ("gemma3", dict(hidden_activation="silu"), r"hidden_activation .* but got 'silu'"),
        ("gemma2", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
         r"rope_scaling type 'dynamic' is not supported"),
        ("gemma2_v4", dict(rope_scaling=dict(type="dynamic", factor=2.0)), r"'dynamic'"),
        ("gemma3", dict(rope_parameters=_LOCAL_LINEAR),
         r"the sliding_attention layers' rope_parameters should have rope_type 'default'"),
        ("gemma3", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4)),
         r"Gemma 3's rope_parameters should be nested by layer type"),
        ("gemma2",
         dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
         r"partial_rotary_factor should be 1.0 for Gemma"),
        ("gemma2", dict(sliding_window=None),
         r"sliding_window should be a positive int where layer_types has sliding_attention layers: "
         r"but got None"),
        ("gemma2", dict(layer_types=["sliding_attention"] * 3),
         r"layer_types should be num_hidden_layers=4 of \('sliding_attention', 'full_attention'\)"),
        ("gemma3", dict(layer_types=["chunked_attention"] * 6), r"layer_types should be"),
        ("gemma", dict(architectures=["LlamaForCausalLM"], model_type="llama"),
         r"gemma.load takes architectures \['Gemma2ForCausalLM', 'Gemma3ForCausalLM', "
         r"'GemmaForCausalLM'\]"),
    ])
def test_what_kvattn_cannot_run_is_refused(name, change, match):
  with pytest.raises(ValueError, match=match):
    gemma.config_from_hf({**families.FAMILIES[name], **change})


def test_missing_or_misshapen_tensors_are_named():
  config = gemma.config_from_hf(families.GEMMA2)
  weights = families.random_weights(families.GEMMA2)
  del weights["model.layers.3.pre_feedforward_layernorm.weight"]
  with pytest.raises(ValueError, match=r"no tensor 'model.layers.3.pre_feedforward_layernorm"):
    gemma.params_from_hf(weights, config)
  weights = families.random_weights(families.GEMMA3)
  weights["model.layers.0.self_attn.q_norm.weight"] = np.zeros(8, np.float32)
  with pytest.raises(ValueError, match=r"q_norm.weight shape should be \(16,\): but got \(8,\)"):
    gemma.params_from_hf(weights, gemma.config_from_hf(families.GEMMA3))


@pytest.mark.slow
def test_example_runs_a_gemma2_checkpoint(tmp_path):
  directory, hf, weights = _checkpoint(tmp_path, "gemma2", seed=5)
  run = subprocess.run([
      sys.executable, "examples/llama.py", f"--checkpoint={directory}", "--prompt_ids=3,14,15",
      "--max_new_tokens=7", "--print_ids"
  ], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  printed = [int(i) for i in run.stdout.strip().splitlines()[-1].split()]
  assert printed == _greedy_numpy(hf, weights, [3, 14, 15], 7)
