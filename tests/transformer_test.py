"""Tests of kvattn/models/transformer.py: the cached step against the uncached forward.

`forward` runs `kvattn.self_attention` (no cache), so agreement checks the
caches, the stacked-layer scan, positions under padding and RoPE.
(tests/gpt2_test.py and tests/llama_test.py check `forward` itself, and its
gradient, against float64 numpy models.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn.models import transformer

ROPE_GQA = transformer.Config(vocab_size=40, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                              head_dim=8, d_ff=64, rope_base=10_000.0, tie_embeddings=False,
                              activation="relu", use_bias=False)
LEARNED = transformer.Config(vocab_size=40, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                             head_dim=8, d_ff=64, max_positions=16)
# The Llama family's pieces: RMSNorm, SwiGLU, q/k/v biases only, scaled RoPE.
LLAMA_LIKE = ROPE_GQA._replace(norm="rms_norm", gated_mlp=True, activation="silu", qkv_bias=True,
                               tie_embeddings=True,
                               rope_scaling=kvattn.rope.Scaling("llama3", 4.0, 1.0, 4.0, 8))
TOL = dict(rtol=1e-4, atol=1e-4)

forward = jax.jit(transformer.forward, static_argnames="config")
step = jax.jit(transformer.step, static_argnames="config")

# Local and global layers: the caches are rings with a window per layer.
MIXED_WINDOWS = LLAMA_LIKE._replace(window_pattern=(3, None, 2))
# The 2026 families' pieces together (Gemma 2 and 3, Qwen3, Phi): pre- and
# post-norms, scaled embeddings, a logit scale and caps, qk-norm, partial
# rotary, local layers with a RoPE base of their own.
FEATURES = MIXED_WINDOWS._replace(norm_placement="pre_post", embed_scale=32**0.5, attn_scale=0.25,
                                  attn_softcap=3.0, final_softcap=4.0, qk_norm="head", rotary_dim=4,
                                  rope_local_base=100.0, activation="gelu_tanh")
POST_NORMS = LLAMA_LIKE._replace(norm_placement="post", qk_norm="projection")  # OLMo 2.


@pytest.mark.parametrize(
    "config", [ROPE_GQA, LEARNED, LLAMA_LIKE, MIXED_WINDOWS, FEATURES, POST_NORMS],
    ids=["rope_gqa", "learned", "llama_like", "mixed_windows", "features", "post_norms"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.slow
def test_step_in_chunks_equals_forward(config, left_pad):
  params = transformer.init_params(jax.random.key(0), config)
  b, t = 3, 10
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, config.vocab_size)
  lengths = np.array([10, 4, 7])
  pos = np.arange(t)[None]
  mask = jnp.asarray(pos >= t - lengths[:, None] if left_pad else pos < lengths[:, None])
  want = forward(params, tokens, mask, config=config)

  caches = transformer.init_caches(config, b, 12)
  outs = []
  for lo, hi in [(0, 5), (5, 10)]:  # Two chunks of one shape: one compilation.
    logits, caches = step(params, caches, tokens[:, lo:hi], mask[:, lo:hi], config=config)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)
  stacks = (caches,) if isinstance(caches, kvattn.KVCache) else caches  # Mixed: one per run.
  assert sum(stack.lengths.shape[0] for stack in stacks) == config.num_layers
  for stack in stacks:
    layers = stack.lengths.shape[0]
    np.testing.assert_array_equal(stack.index, [t] * layers)
    np.testing.assert_array_equal(stack.lengths, [lengths] * layers)


def test_mixed_windows_get_a_cache_per_run_of_layers():
  """Local layers keep rings of their window, global ones linear caches: memory saved."""
  config = LLAMA_LIKE._replace(num_layers=5, window_pattern=(3, 3, None, 2, 2))
  assert transformer.layer_runs(config) == ((3, 0, 2), (None, 2, 3), (2, 3, 5))
  caches = transformer.init_caches(config, 2, 64, rewind_room=1)
  assert [c.k.shape[:3] for c in caches] == [(2, 2, 4), (1, 2, 64), (2, 2, 3)]
  assert [c.ring for c in caches] == [True, False, True]


def test_init_shapes_and_stacked_caches():
  params = transformer.init_params(jax.random.key(0), ROPE_GQA)
  layers = params["layers"]
  assert layers["attn"]["wq"].shape == (3, 32, 4, 8)
  assert layers["attn"]["wk"].shape == (3, 32, 2, 8)
  assert layers["mlp"]["w_in"].shape == (3, 32, 64)
  assert params["unembed"].shape == (32, 40) and "pos_embed" not in params
  assert "bq" not in layers["attn"] and "b_in" not in layers["mlp"]
  caches = transformer.init_caches(ROPE_GQA, 2, 9)  # One run of layers: a tuple of one stack.
  assert len(caches) == 1
  assert caches[0].k.shape == (3, 2, 9, 2, 8) and caches[0].index.shape == (3,)
  assert transformer.step_fn(ROPE_GQA) is transformer.step_fn(ROPE_GQA)


@pytest.mark.parametrize("call, match", [
    (lambda p, c: transformer.step(p, c, jnp.zeros(
        (2,), jnp.int32), None, config=LEARNED), r"tokens should be int with shape \(B, T\)"),
    (lambda p, c: transformer.step(p, c, jnp.zeros(
        (2, 3)), None, config=LEARNED), r"tokens should be int"),
    (lambda p, c: transformer.step(p, c, jnp.zeros((2, 3), jnp.int32), jnp.ones(
        (2, 4), bool), config=LEARNED), r"mask should be bool with shape \(B, T\)=\(2, 3\)"),
])
def test_bad_inputs_raise(call, match):
  params = transformer.init_params(jax.random.key(0), LEARNED)
  with pytest.raises(ValueError, match=match):
    call(params, transformer.init_caches(LEARNED, 2, 8))


def test_llama_like_params_layout():
  layers = transformer.init_params(jax.random.key(0), LLAMA_LIKE)["layers"]
  assert sorted(layers["attn"]) == ["bk", "bq", "bv", "wk", "wo", "wq", "wv"]
  assert sorted(layers["mlp"]) == ["w_gate", "w_in", "w_out"]
  assert sorted(layers["ln1"]) == ["scale"]


@pytest.mark.parametrize("change, match", [
    (dict(activation="swish"), r"config.activation should be one of"),
    (dict(norm="batch_norm"), r"config.norm should be one of \('layer_norm', 'rms_norm'\)"),
    (dict(num_kv_heads=3), r"query heads N=4 should be a multiple of the kv heads K=3"),
    (dict(d_ff=0), r"d_ff should be a positive int"),
    (dict(rope_base=None, max_positions=8, rope_scaling=kvattn.rope.Scaling(
        "linear", 2.0)), r"config.rope_scaling needs config.rope_base"),
    (dict(rope_scaling=kvattn.rope.Scaling("ntk", 2.0)), r"config.rope_scaling.kind"),
    (dict(window_pattern=(4, 0)), r"config.window_pattern should be a positive int: but got 0"),
    (dict(norm_placement="sandwich"), r"config.norm_placement should be one of \('pre', "),
    (dict(qk_norm="layer"), r"config.qk_norm should be None or one of \('head', 'projection'\)"),
    (dict(attn_softcap=0.0), r"config.attn_softcap should be None or a positive float: but got 0"),
    (dict(final_softcap=-1.0), r"config.final_softcap should be None or a positive float"),
    (dict(rotary_dim=3), r"config.rotary_dim should be"),
    (dict(rope_base=None, max_positions=8, rope_local_base=10.0),
     r"config.rotary_dim and config.rope_local_base need config.rope_base"),
])
def test_bad_configs_raise(change, match):
  with pytest.raises(ValueError, match=match):
    transformer.init_params(jax.random.key(0), ROPE_GQA._replace(**change))
  with pytest.raises(ValueError, match=match):
    transformer.step_fn(ROPE_GQA._replace(**change))


@pytest.mark.parametrize("window_pattern", [4, [4, None]])
def test_a_window_pattern_that_is_not_a_tuple_raises(window_pattern):
  with pytest.raises(
      TypeError, match=r"config.window_pattern should be a tuple of positive ints "
      r"and Nones \(W for every layer: \(W,\)\)"):
    transformer.check_config(ROPE_GQA._replace(window_pattern=window_pattern))
  with pytest.raises(TypeError, match=r"sliding_window"):  # Issue 21: window_pattern=(W,) now.
    transformer.Config(**ROPE_GQA._asdict(), sliding_window=4)


def test_one_window_for_every_layer_equals_the_per_layer_pattern():
  """`window_pattern=(W,)` is `(W,) * L`: the same windows, caches and logits."""
  short, full = (ROPE_GQA._replace(window_pattern=p) for p in [(2,), (2,) * ROPE_GQA.num_layers])
  assert short.layer_windows == full.layer_windows == (2, 2, 2)
  assert ROPE_GQA.layer_windows == (None, None, None)
  params = transformer.init_params(jax.random.key(0), ROPE_GQA)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, ROPE_GQA.vocab_size)
  mask = jnp.ones(tokens.shape, bool)
  want = forward(params, tokens, mask, config=full)
  np.testing.assert_array_equal(forward(params, tokens, mask, config=short), want)
  assert not np.allclose(want, forward(params, tokens, mask, config=ROPE_GQA))  # W matters.
  stepped = []
  for config in short, full:
    caches = transformer.init_caches(config, 2, 8)
    assert [(c.ring, c.k.shape) for c in caches] == [(True, (3, 2, 2, 2, 8))]
    stepped.append(step(params, caches, tokens, mask, config=config)[0])
  np.testing.assert_array_equal(stepped[0], stepped[1])
  np.testing.assert_allclose(stepped[0], want, **TOL)


@pytest.mark.slow
def test_forward_trains_with_blocks_and_under_jit():
  """A gradient step through forward lowers the loss; blocks do not change the logits."""
  config = LLAMA_LIKE
  params = transformer.init_params(jax.random.key(0), config)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, config.vocab_size)
  mask = jnp.asarray(np.arange(20)[None] < np.array([[20], [13]]))

  def loss(p, block_size=None):
    logits = transformer.forward(p, tokens[:, :-1], mask[:, :-1], config=config,
                                 block_size=block_size)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    real = mask[:, 1:]
    return jnp.sum(jnp.where(real, nll, 0.0)) / jnp.sum(real.astype(jnp.float32))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  moved = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(jax.jit(loss)(moved)) < float(value)
  np.testing.assert_allclose(jax.jit(loss, static_argnums=1)(params, 4), value, rtol=1e-5)


@pytest.mark.parametrize("pad_id", [-100, 40], ids=["negative", "vocab_size"])
@pytest.mark.slow
def test_out_of_range_pad_ids_change_no_real_logit(pad_id):
  """jnp.take gives NaN embeddings for ids out of range; at padding they stay inert."""
  config = ROPE_GQA
  params = transformer.init_params(jax.random.key(0), config)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 1, config.vocab_size))
  mask = np.array([[False, False, True, True, True, True], [True] * 4 + [False] * 2])
  outs = []
  for pad in (0, pad_id):
    padded = jnp.asarray(np.where(mask, tokens, pad), jnp.int32)
    caches = transformer.init_caches(config, 2, 8)
    logits, caches = step(params, caches, padded, jnp.asarray(mask), config=config)
    nxt, _ = step(params, caches, padded[:, -1:] * 0 + 3, None, config=config)
    outs.append(np.concatenate([np.asarray(logits), np.asarray(nxt)], 1))
  real = np.concatenate([mask, np.ones((2, 1), bool)], 1)
  assert np.all(np.isfinite(outs[1][real]))
  np.testing.assert_allclose(outs[1][real], outs[0][real], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pad_id", [-100, 40], ids=["negative", "vocab_size"])
@pytest.mark.slow
def test_out_of_range_pad_ids_leave_the_gradient_finite_and_unchanged(pad_id):
  """An out-of-range id embeds to NaN; at padding it must not reach a weight's gradient."""
  config = LLAMA_LIKE
  params = transformer.init_params(jax.random.key(0), config)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 1, config.vocab_size))
  mask = np.array([[False, False] + [True] * 6, [True] * 5 + [False] * 3])

  def loss(p, pad):
    padded = jnp.asarray(np.where(mask, tokens, pad), jnp.int32)
    return jnp.sum(transformer.forward(p, padded, jnp.asarray(mask), config=config)**2)

  want = jax.grad(loss)(params, 0)
  got = jax.grad(loss)(params, pad_id)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [LLAMA_LIKE, MIXED_WINDOWS], ids=["llama_like", "mixed"])
@pytest.mark.slow
def test_unstacked_layers_give_the_same_logits_and_caches(config):
  """unstack_layers: per-layer params run unrolled, with the stacked run's numbers."""
  params = transformer.init_params(jax.random.key(0), config)
  flat = transformer.unstack_layers(params)
  assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == config.num_layers
  assert transformer.unstack_layers(flat) is flat
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, config.vocab_size)
  mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3]]))
  caches = transformer.init_caches(config, 2, 8)
  want, want_caches = step(params, caches, tokens, mask, config=config)
  got, got_caches = step(flat, caches, tokens, mask, config=config)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got_caches), jax.tree.leaves(want_caches)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(forward(flat, tokens, mask, config=config),
                             forward(params, tokens, mask, config=config), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [ROPE_GQA, LEARNED, LLAMA_LIKE, FEATURES, POST_NORMS],
                         ids=["untied", "learned", "llama_like", "features", "post_norms"])
@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "unstacked"])
def test_params_logical_axes_shard_every_leaf_on_a_mesh(config, unstacked):
  """Every param has logical axes (MLP and vocabulary too, gated or not, stacked or per
  layer), and the specs they give under the model's rules place each leaf on a mesh."""
  params = jax.eval_shape(lambda: transformer.init_params(jax.random.key(0), config))
  if unstacked:
    params = jax.eval_shape(transformer.unstack_layers, params)
  axes = transformer.params_logical_axes(params)
  flat = jax.tree.leaves(params)
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(flat)
  for leaf, spec in zip(flat, specs):
    assert len(spec) == leaf.ndim, (leaf.shape, spec)
  mesh = kvattn.sharding.make_mesh("data:2,model:4", jax.devices("cpu")[:8])
  shardings = kvattn.sharding.named(
      kvattn.sharding.tree_specs(params, axes, mesh, transformer.RULES, name="params"), mesh)
  layer_shardings = shardings["layers"][0] if unstacked else shardings["layers"]
  lead = () if unstacked else (None,)
  assert layer_shardings["mlp"]["w_in"].spec == jax.sharding.PartitionSpec(*lead, None, "model")
  assert layer_shardings["attn"]["wq"].spec == jax.sharding.PartitionSpec(
      *lead, None, "model", None)
  assert shardings["embed"].spec == jax.sharding.PartitionSpec(None, None)
  with pytest.raises(ValueError, match=r"params\['extra'\] should be one of the transformer's"):
    transformer.params_logical_axes({**params, "extra": params["embed"]})
