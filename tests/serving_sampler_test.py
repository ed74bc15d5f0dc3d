"""Per-row draws: each row's filters against a float64 numpy reference, and seeds."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvattn.serving import sampler


def reference_filter(logits, t, k, p, min_p):
  """float64 numpy: Hugging Face's order, temperature, top-k, top-p, min-p."""
  x = logits.astype(np.float64) / (t if t > 0 else 1.0)
  if k > 0:
    x = np.where(x < np.sort(x)[::-1][min(k, x.size) - 1], -np.inf, x)
  order = np.argsort(-x, kind="stable")
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
  keep = np.zeros(x.size, bool)
  keep[order] = (above < p) | (p >= 1.0)
  threshold = x[keep].min()
  x = np.where(x < threshold, -np.inf, x)
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  return np.where(probs < min_p * probs.max(), -np.inf, x)


@pytest.mark.parametrize("rows_sort", [True, False])  # Whether any row needs the sort.
def test_filters_match_the_float64_reference_row_by_row(rows_sort):
  rng = np.random.default_rng(0)
  rows, vocab = 12, 50
  logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
  logits[3, :5] = logits[3, 0]  # Ties.
  t = rng.choice([0.0, 0.5, 1.0, 1.7], size=rows).astype(np.float32)
  k = rng.choice([0, 1, 3, 10, 50, 80], size=rows).astype(np.int32)
  p = rng.choice([1.0, 0.9, 0.5, 0.05], size=rows).astype(np.float32)
  min_p = rng.choice([0.0, 0.1, 0.5], size=rows).astype(np.float32)
  if not rows_sort:
    k[:], p[:] = 0, 1.0
  got = np.asarray(
      sampler.filtered_logits(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(k), jnp.asarray(p),
                              jnp.asarray(min_p)))
  for r in range(rows):
    want = reference_filter(logits[r], t[r], k[r], p[r], min_p[r])
    np.testing.assert_array_equal(np.isinf(got[r]), np.isinf(want), err_msg=str(r))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[r][finite], want[finite], rtol=1e-6)


def draw(logits, seeds, counts, t=1.0, k=0, p=1.0, min_p=0.0, num_top=0):
  rows = logits.shape[0]
  full = lambda v, dtype: jnp.full((rows,), v, dtype)
  return sampler.draw(jnp.asarray(logits), jnp.asarray(seeds, jnp.uint32),
                      jnp.asarray(counts, jnp.int32), full(t, jnp.float32), full(k, jnp.int32),
                      full(p, jnp.float32), full(min_p, jnp.float32), num_top)


def test_a_rows_token_depends_on_its_seed_and_count_not_on_its_neighbours():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 40)).astype(np.float32)
  seeds, counts = np.arange(8) * 7, np.arange(8) % 3
  tokens = np.asarray(draw(logits, seeds, counts).tokens)
  perm = rng.permutation(8)
  shuffled = np.asarray(draw(logits[perm], seeds[perm], counts[perm]).tokens)
  np.testing.assert_array_equal(shuffled, tokens[perm])
  again = np.asarray(draw(logits[:1], seeds[:1], counts[:1]).tokens)
  assert again[0] == tokens[0]


def test_draws_follow_the_filtered_distribution():
  logits = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05]], np.float32))
  n = 4000
  rows = np.repeat(logits, n, axis=0)
  tokens = np.asarray(draw(rows, np.full(n, 9), np.arange(n), k=3).tokens)
  freq = np.bincount(tokens, minlength=4) / n
  np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)
  greedy = np.asarray(draw(rows[:4], np.arange(4), np.arange(4), t=0.0).tokens)
  np.testing.assert_array_equal(greedy, 0)


@pytest.mark.parametrize("num_top", [0, 3])
def test_logprobs_are_the_models_before_temperature(num_top):
  logits = np.asarray([[2.0, 1.0, 0.5, -1.0, 0.0]], np.float32)
  out = draw(logits, [0], [0], t=0.0, num_top=num_top)
  want = logits[0] - np.log(np.exp(logits[0].astype(np.float64)).sum())
  np.testing.assert_allclose(float(out.logprobs[0]), want[0], rtol=1e-6)
  assert out.top_ids.shape == (1, num_top) and out.top_logprobs.shape == (1, num_top)
  np.testing.assert_array_equal(np.asarray(out.top_ids[0]), [0, 1, 2][:num_top])
  np.testing.assert_allclose(np.asarray(out.top_logprobs[0]), want[:3][:num_top], rtol=1e-6)
