"""Tests of kvattn.sampling: exact filters, and draws checked against their distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn import sampling

PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)
NUM_DRAWS = 20_000


@jax.jit
def _draws(key, logits, temperature, top_p):
  """NUM_DRAWS draws from one row of logits (one key draws the whole batch)."""
  batch = jnp.broadcast_to(logits[None], (NUM_DRAWS, logits.shape[0]))
  return sampling.sample(key, batch, temperature=temperature, top_p=top_p)


def _frequencies(key, temperature=1.0, top_k=None, top_p=1.0):
  if top_k is None:
    draws = _draws(key, jnp.asarray(LOGITS), temperature, top_p)
  else:
    batch = jnp.broadcast_to(jnp.asarray(LOGITS)[None], (NUM_DRAWS, LOGITS.size))
    draws = jax.jit(sampling.sample, static_argnames="top_k")(key, batch, temperature=temperature,
                                                              top_k=top_k, top_p=top_p)
  return np.bincount(np.asarray(draws), minlength=LOGITS.size) / NUM_DRAWS


def _assert_distribution(freq, want):
  """Every frequency within 5 standard errors of its probability (0 stays exactly 0)."""
  want = np.asarray(want, np.float64)
  want = want / want.sum()
  stderr = np.sqrt(want * (1 - want) / NUM_DRAWS)
  np.testing.assert_array_less(np.abs(freq - want), 5 * stderr + 1e-12)


def test_plain_sampling_follows_softmax():
  _assert_distribution(_frequencies(jax.random.key(0)), PROBS)


def test_temperature_sharpens_and_flattens():
  _assert_distribution(_frequencies(jax.random.key(1), temperature=0.5), PROBS**2)
  _assert_distribution(_frequencies(jax.random.key(2), temperature=2.0), PROBS**0.5)


@pytest.mark.parametrize("k", [2, 3])
def test_top_k_renormalises_the_k_most_likely(k):
  want = np.where(np.arange(PROBS.size) < k, PROBS, 0.0)
  _assert_distribution(_frequencies(jax.random.key(3), top_k=k), want)


@pytest.mark.parametrize("p, kept", [(0.3, 1), (0.39, 1), (0.41, 2), (0.8, 3), (0.9, 4), (1.0, 5)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
  # Cumulative: 0.4, 0.7, 0.85, 0.95, 1.0; a token is kept while the mass above it is < p.
  want = np.where(np.arange(PROBS.size) < kept, PROBS, 0.0)
  _assert_distribution(_frequencies(jax.random.key(4), top_p=p), want)


def test_top_k_then_top_p_with_temperature():
  # temperature 2: probs ~ sqrt(PROBS); top_k=4 then the nucleus of 0.5 of those.
  scaled = np.sqrt(PROBS[:4]) / np.sqrt(PROBS[:4]).sum()  # 0.328, 0.284, 0.201, 0.164...
  kept = int(np.sum(np.cumsum(scaled) - scaled < 0.5))
  want = np.where(np.arange(PROBS.size) < kept, np.sqrt(PROBS), 0.0)
  _assert_distribution(_frequencies(jax.random.key(5), temperature=2.0, top_k=4, top_p=0.5), want)


def test_filters_exactly():
  logits = jnp.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
  np.testing.assert_array_equal(np.isfinite(sampling.top_k_logits(logits, 2)),
                                [[0, 1, 0, 1, 0]])  # The tie with the 2nd largest is kept.
  np.testing.assert_array_equal(np.isfinite(sampling.top_k_logits(logits, 3)), [[0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.isfinite(sampling.top_p_logits(logits, 1e-6)), [[0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(np.isfinite(sampling.top_p_logits(logits, 1.0)), [[1, 1, 1, 1, 1]])


def test_top_p_one_keeps_a_large_vocabulary_whole():
  """Over GPT-2's 50,257 tokens the float32 running sum passes 1 early: p = 1 must cut nothing."""
  logits = 3 * jax.random.normal(jax.random.key(7), (4, 50_257))
  assert np.all(np.isfinite(sampling.top_p_logits(logits, 1.0)))
  assert np.all(np.isfinite(sampling.top_p_logits(logits, jnp.float32(1.0))))


def test_top_p_cuts_a_token_whose_mass_above_is_exactly_p():
  """Issue 20: mass above the 0.1 tokens is exactly 0.8, so top_p=0.8 keeps 0.5 and 0.3 only."""
  logits = jnp.log(jnp.array([[0.3, 0.1, 0.1, 0.5]], jnp.float32))
  np.testing.assert_array_equal(np.isfinite(sampling.top_p_logits(logits, 0.8)), [[1, 0, 0, 1]])
  draws = sampling.sample(jax.random.key(11), jnp.broadcast_to(logits, (NUM_DRAWS, 4)), top_p=0.8)
  assert set(np.unique(np.asarray(draws))) == {0, 3}


def test_sampler_with_top_k_or_top_p_alone_samples_at_temperature_one():
  """Issue 20: Sampler(top_p=...) used to default to temperature 0, i.e. greedy."""
  assert sampling.Sampler().temperature == 0.0
  assert sampling.Sampler(top_p=0.9).temperature == 1.0
  assert sampling.Sampler(top_k=3).temperature == 1.0
  logits = jnp.broadcast_to(jnp.asarray(LOGITS)[None], (NUM_DRAWS, LOGITS.size))
  draws = jax.jit(sampling.Sampler(top_p=0.8))(jax.random.key(12), logits)
  _assert_distribution(
      np.bincount(np.asarray(draws), minlength=LOGITS.size) / NUM_DRAWS,
      np.where(np.arange(PROBS.size) < 3, PROBS, 0.0))
  # An explicit temperature of 0 stays greedy.
  np.testing.assert_array_equal(
      sampling.Sampler(0.0, top_p=0.8)(jax.random.key(0), logits), np.zeros(NUM_DRAWS))


def test_sampler_settings_are_traced_leaves():
  """temperature and top_p are pytree leaves (a new value reuses a compilation); top_k is not."""
  leaves, treedef = jax.tree.flatten(sampling.Sampler(0.7, 5, 0.9))
  assert leaves == [0.7, 0.9]
  assert jax.tree.structure(sampling.Sampler(0.2, 5, 0.5)) == treedef
  assert jax.tree.structure(sampling.Sampler(0.2, 6, 0.5)) != treedef
  calls = []

  @jax.jit
  def draw(sampler, key, logits):
    calls.append(1)
    return sampler(key, logits)

  logits = jnp.asarray(LOGITS)[None]
  for t, p in [(0.7, 0.9), (1.3, 0.5), (0.0, 0.2)]:
    draw(sampling.Sampler(t, 5, p), jax.random.key(0), logits)
  assert len(calls) == 1
  # Traced temperature 0 is greedy too.
  np.testing.assert_array_equal(
      draw(sampling.Sampler(0.0, 5, 0.9), jax.random.key(1),
           jnp.asarray(LOGITS[::-1])[None]), [4])


def test_top_k_at_or_above_the_vocabulary_keeps_everything():
  logits = jax.random.normal(jax.random.key(8), (2, 6))
  for k in (6, 7, 100):
    np.testing.assert_array_equal(sampling.top_k_logits(logits, k), logits)
  key = jax.random.key(9)
  np.testing.assert_array_equal(_sample(key, logits, top_k=100), _sample(key, logits))


def test_ties_keep_every_tied_token_and_greedy_takes_the_first():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
  np.testing.assert_array_equal(np.isfinite(sampling.top_k_logits(logits, 1)),
                                [[False, True, True, False, True]])
  np.testing.assert_array_equal(np.isfinite(sampling.top_p_logits(logits, 0.1)),
                                [[False, True, True, False, True]])
  np.testing.assert_array_equal(sampling.greedy(logits), [1])
  np.testing.assert_array_equal(
      _sample(jax.random.key(0), logits, temperature=0.0, top_k=2, top_p=0.5), [1])


_sample = jax.jit(sampling.sample, static_argnames="top_k")


def test_greedy_and_its_equivalents():
  logits = jax.random.normal(jax.random.key(6), (64, 50))
  want = np.argmax(np.asarray(logits), axis=-1)
  key = jax.random.key(7)
  np.testing.assert_array_equal(jax.jit(sampling.greedy)(logits), want)
  np.testing.assert_array_equal(_sample(key, logits, temperature=0.0, top_p=0.9), want)
  np.testing.assert_array_equal(_sample(key, logits, top_k=1), want)
  np.testing.assert_array_equal(_sample(key, logits, temperature=1.0, top_p=1e-6), want)
  np.testing.assert_array_equal(jax.jit(sampling.Sampler())(key, logits), want)
  assert sampling.greedy(logits).dtype == jnp.int32


def test_same_key_same_tokens_other_key_other_tokens():
  logits = jax.random.normal(jax.random.key(8), (256, 50))
  s = jax.jit(sampling.Sampler(temperature=1.0, top_k=20, top_p=0.9))
  a = s(jax.random.key(9), logits)
  np.testing.assert_array_equal(a, s(jax.random.key(9), logits))
  assert np.any(np.asarray(a) != np.asarray(s(jax.random.key(10), logits)))


def test_sampler_is_hashable_by_value():
  assert sampling.Sampler(0.7, 5, 0.9) == sampling.Sampler(0.7, 5, 0.9)
  assert hash(sampling.Sampler(0.7, 5, 0.9)) == hash(sampling.Sampler(0.7, 5, 0.9))
  assert sampling.Sampler(0.7) != sampling.Sampler(0.8)


@pytest.mark.parametrize("call, match", [
    (lambda: sampling.greedy(jnp.zeros((5,))), r"logits shape should be \(B, V\)"),
    (lambda: sampling.greedy(jnp.zeros((2, 5), jnp.int32)), r"logits dtype should be floating"),
    (lambda: sampling.top_k_logits(jnp.zeros((2, 5)), 0), r"k should be a positive int: but got 0"),
    (lambda: sampling.top_k_logits(jnp.zeros((2, 5)), True), r"k should be a positive int"),
    (lambda: sampling.top_p_logits(jnp.zeros((2, 5)), 0.0), r"p should be in \(0, 1\]"),
    (lambda: sampling.sample(jax.random.key(0), jnp.zeros(
        (2, 5)), temperature=-1.0), r"temperature should be >= 0"),
    (lambda: sampling.Sampler(top_p=1.5), r"top_p should be in \(0, 1\]"),
    (lambda: sampling.Sampler(top_k=0), r"top_k should be a positive int"),
    (lambda: sampling.Sampler(top_k=True), r"top_k should be a positive int"),
    (lambda: sampling.Sampler(-0.5), r"temperature should be a number >= 0"),
    (lambda: sampling.Sampler("0.5"), r"temperature should be a number >= 0"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
