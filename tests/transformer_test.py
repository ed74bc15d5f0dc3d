"""Tests of kvattn/models/transformer.py: the cached step against the uncached forward.

`forward` computes attention directly, without kvattn, so agreement checks
the caches, the stacked-layer scan, positions under padding and RoPE.
(tests/gpt2_test.py checks `forward` itself against a float64 numpy GPT-2.)
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn.models import transformer

ROPE_GQA = transformer.Config(vocab_size=40, num_layers=3, d_model=32, num_heads=4,
                              num_kv_heads=2, head_dim=8, d_ff=64, rope_base=10_000.0,
                              tie_embeddings=False, activation="relu", use_bias=False)
LEARNED = transformer.Config(vocab_size=40, num_layers=2, d_model=32, num_heads=4,
                             num_kv_heads=4, head_dim=8, d_ff=64, max_positions=16)
TOL = dict(rtol=1e-4, atol=1e-4)

forward = jax.jit(transformer.forward, static_argnames="config")
step = jax.jit(transformer.step, static_argnames="config")


@pytest.mark.parametrize("config", [ROPE_GQA, LEARNED], ids=["rope_gqa", "learned"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
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
  np.testing.assert_array_equal(caches.index, [t] * config.num_layers)
  np.testing.assert_array_equal(caches.lengths, [lengths] * config.num_layers)


def test_init_shapes_and_stacked_caches():
  params = transformer.init_params(jax.random.key(0), ROPE_GQA)
  layers = params["layers"]
  assert layers["attn"]["wq"].shape == (3, 32, 4, 8)
  assert layers["attn"]["wk"].shape == (3, 32, 2, 8)
  assert layers["mlp"]["w_in"].shape == (3, 32, 64)
  assert params["unembed"].shape == (32, 40) and "pos_embed" not in params
  assert "bq" not in layers["attn"] and "b_in" not in layers["mlp"]
  caches = transformer.init_caches(ROPE_GQA, 2, 9)
  assert caches.k.shape == (3, 2, 9, 2, 8) and caches.index.shape == (3,)
  assert transformer.step_fn(ROPE_GQA) is transformer.step_fn(ROPE_GQA)


@pytest.mark.parametrize("call, match", [
    (lambda p, c: transformer.step(p, c, jnp.zeros((2,), jnp.int32), None, config=LEARNED),
     r"tokens should be int with shape \(B, T\)"),
    (lambda p, c: transformer.step(p, c, jnp.zeros((2, 3)), None, config=LEARNED),
     r"tokens should be int"),
    (lambda p, c: transformer.step(p, c, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool),
                                   config=LEARNED),
     r"mask should be bool with shape \(B, T\)=\(2, 3\)"),
])
def test_bad_inputs_raise(call, match):
  params = transformer.init_params(jax.random.key(0), LEARNED)
  with pytest.raises(ValueError, match=match):
    call(params, transformer.init_caches(LEARNED, 2, 8))


def test_unknown_activation_raises():
  with pytest.raises(ValueError, match="config.activation should be one of"):
    transformer.init_params(jax.random.key(0), LEARNED._replace(activation="swish"))


@pytest.mark.parametrize("pad_id", [-100, 40], ids=["negative", "vocab_size"])
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


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
