"""Partial softmaxes (kvattn/online_softmax.py) against a float64 softmax over all keys."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvattn import online_softmax
from kvattn.online_softmax import Partial

R, H = 5, 4  # Query rows, head dim.


def partial_of(logits, values, mask):
  """The partial of rows over one block of keys: logits, mask [R, C], values [C, H]."""
  p, m = online_softmax.probabilities(jnp.asarray(logits, jnp.float32), jnp.asarray(mask), 1)
  return Partial(p @ jnp.asarray(values, jnp.float32), m, jnp.sum(p, axis=1))


def reference(logits, values, mask):
  """Softmax attention over all keys, float64; rows with no key give zeros."""
  logits = np.where(mask, logits, -np.inf)
  m = np.max(logits, axis=1, keepdims=True)
  p = np.where(mask, np.exp(logits - np.where(np.isfinite(m), m, 0.0)), 0.0)
  l = p.sum(1, keepdims=True)
  return (p / np.where(l == 0, 1.0, l)) @ values


@pytest.mark.parametrize("cuts", [[3], [1, 4], [2, 4, 6], [1, 2, 3, 4, 5, 6]])
def test_blocks_accumulated_in_any_order_equal_softmax_over_all_keys(cuts):
  rng = np.random.default_rng(len(cuts))
  c = 7
  logits = 5 * rng.standard_normal((R, c))
  values = rng.standard_normal((c, H))
  mask = rng.random((R, c)) > 0.3
  mask[0] = False  # A row that sees nothing.
  bounds = [0, *cuts, c]
  parts = [
      partial_of(logits[:, lo:hi], values[lo:hi], mask[:, lo:hi])
      for lo, hi in zip(bounds[:-1], bounds[1:])
  ]
  want = reference(logits, values, mask)
  for order in (parts, parts[::-1]):
    acc = online_softmax.empty((R,), H)
    for part in order:
      acc = online_softmax.accumulate(acc, part)
    np.testing.assert_allclose(online_softmax.normalize(acc), want, rtol=1e-5, atol=1e-6)
  stacked = Partial(*(jnp.stack(x) for x in zip(*parts)))
  np.testing.assert_allclose(online_softmax.normalize(online_softmax.accumulate_axis(stacked, 0)),
                             want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(online_softmax.normalize(acc)[0], 0.0)


def test_masked_probabilities_are_exactly_zero_and_the_max_is_finite():
  logits = jnp.array([[1.0, 50.0, 2.0], [3.0, 4.0, 5.0]])
  mask = jnp.array([[True, False, True], [False, False, False]])
  p, m = online_softmax.probabilities(logits, mask, 1)
  assert p[0, 1] == 0.0 and np.all(p[1] == 0.0)
  assert m[0] == 2.0 and m[1] == online_softmax.MASKED and np.isfinite(m[1])
