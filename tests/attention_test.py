"""The kernel level: cached_attention with the caller's own q, k, v."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import reference

H = 8
cached_attention = jax.jit(kvattn.cached_attention)


def _qkv(b, t, n, k, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, H)), jax.random.normal(kk, (b, t, k, H)),
          jax.random.normal(kv, (b, t, k, H)))


@pytest.mark.parametrize("n, k", [(4, 4), (4, 2), (4, 1)])
def test_chunks_equal_jax_dot_product_attention(n, k):
  b, t = 2, 10
  q, kk, vv = _qkv(b, t, n, k)
  want = jax.nn.dot_product_attention(q, kk, vv, is_causal=True)
  cache = kvattn.init_cache(b, 16, k, H)
  outs = []
  for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 10)):
    o, cache = cached_attention(q[:, lo:hi], kk[:, lo:hi], vv[:, lo:hi], cache)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.k[:, :t], kk)


def test_padding_and_prefix_lm_against_float64_reference():
  q, k, v = _qkv(2, 6, 4, 2, seed=1)
  mask = jnp.array([[False, False, True, True, True, True], [True, True, True, True, False, False]])
  cache = kvattn.init_cache(2, 8, 2, H)
  o1, cache = cached_attention(q[:, :4], k[:, :4], v[:, :4], cache, mask[:, :4], prefix_lm=True)
  o2, cache = cached_attention(q[:, 4:], k[:, 4:], v[:, 4:], cache, mask[:, 4:], prefix_lm=True)
  got = jnp.concatenate([o1, o2], 1)
  chunk = np.array([0, 0, 0, 0, 1, 1])
  for b in range(2):
    idx = np.nonzero(np.asarray(mask[b]))[0]
    want = reference.attention(q[b, idx], k[b, idx], v[b, idx],
                               reference.allowed_mask(chunk[idx], prefix_lm=True))
    np.testing.assert_allclose(got[b, idx], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[b, ~np.asarray(mask[b])], 0.0)


def test_query_that_sees_nothing_gives_zeros():
  q, k, v = _qkv(1, 3, 2, 2, seed=2)
  mask = jnp.zeros((1, 3), bool)
  o, cache = cached_attention(q, k, v, kvattn.init_cache(1, 4, 2, H), mask)
  np.testing.assert_array_equal(o, 0.0)
  assert int(cache.index) == 3 and not np.any(cache.valid)


def test_large_logits_stay_finite():
  q, k, v = _qkv(1, 4, 2, 2, seed=3)
  o, _ = cached_attention(1e4 * q, 1e4 * k, v, kvattn.init_cache(1, 4, 2, H))
  assert np.all(np.isfinite(o))


@pytest.mark.parametrize("shapes, match", [
    (((1, 2, 4, 6), (1, 2, 2, H), (1, 2, 2, H)), r"q shape should be \(B, T, N, H\)=\(1, None, None, 8\)"),
    (((1, 2, 4, H), (1, 3, 2, H), (1, 2, 2, H)), r"k shape should be \(B, T, K, H\)=\(1, 2, 2, 8\)"),
    (((1, 2, 4, H), (1, 2, 2, H), (1, 2, 1, H)), r"v shape should be \(B, T, K, H\)=\(1, 2, 2, 8\)"),
    (((1, 2, 3, H), (1, 2, 2, H), (1, 2, 2, H)), r"query heads N=3 should be a multiple of the kv heads K=2"),
    (((1, 0, 4, H), (1, 0, 2, H), (1, 0, 2, H)), r"q shape should be \(B, T, N, H\) with T >= 1"),
])
def test_kernel_errors(shapes, match):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    kvattn.cached_attention(q, k, v, kvattn.init_cache(1, 4, 2, H))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
