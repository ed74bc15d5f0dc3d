"""The cache pytree: construction, positions, and overflow that loses nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import reference

DM, N, K, H = 16, 4, 2, 8


def test_init_cache_shapes_and_dtypes():
  cache = kvattn.init_cache(3, 10, K, H, jnp.bfloat16)
  assert cache.k.shape == cache.v.shape == (3, 10, K, H)
  assert cache.k.dtype == jnp.bfloat16
  assert cache.valid.shape == (3, 10) and cache.valid.dtype == jnp.bool_
  assert cache.lengths.shape == (3,) and cache.lengths.dtype == jnp.int32
  assert cache.index.shape == () and cache.index.dtype == jnp.int32
  assert not kvattn.overflowed(cache)
  assert (cache.batch_size, cache.max_len, cache.num_kv_heads, cache.head_dim) == (3, 10, K, H)
  # Every leaf is an array: the cache passes through jit, scan and donation.
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(cache))


def test_cache_is_immutable_and_replaceable():
  cache = kvattn.init_cache(1, 4, K, H)
  with pytest.raises(AttributeError):
    cache.index = jnp.int32(3)
  moved = cache._replace(index=jnp.int32(3))
  assert int(moved.index) == 3 and int(cache.index) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch should be a positive int: but got 0"),
    (dict(max_len=2.5), "max_len should be a positive int: but got 2.5"),
    (dict(num_kv_heads=-1), "num_kv_heads should be a positive int: but got -1"),
    (dict(head_dim=True), "head_dim should be a positive int: but got True"),
    (dict(dtype=jnp.int32), "dtype should be a floating dtype: but got int32"),
])
def test_init_cache_errors(kwargs, match):
  args = dict(batch=1, max_len=4, num_kv_heads=K, head_dim=H) | kwargs
  with pytest.raises(ValueError, match=match):
    kvattn.init_cache(**args)


def test_token_positions_ignore_left_padding():
  cache = kvattn.init_cache(2, 16, K, H)._replace(lengths=jnp.array([0, 5], jnp.int32))
  mask = jnp.array([[False, False, True, True], [True, False, True, True]])
  np.testing.assert_array_equal(kvattn.token_positions(cache, mask), [[0, 0, 0, 1], [5, 6, 6, 7]])
  np.testing.assert_array_equal(kvattn.token_positions(cache), [[0], [5]])


def test_token_positions_bad_mask():
  cache = kvattn.init_cache(2, 16, K, H)
  with pytest.raises(ValueError, match=r"mask shape should be \(B, T\)"):
    kvattn.token_positions(cache, jnp.ones((3, 4), bool))


def _params():
  return kvattn.init_params(jax.random.key(0), DM, N, num_kv_heads=K, head_dim=H)


@pytest.mark.parametrize("first, second", [(6, 3), (8, 1), (5, 4)])
def test_overflow_writes_nothing_and_sets_sticky_flag(first, second):
  params = _params()
  prefill = jax.jit(kvattn.prefill)
  x = jax.random.normal(jax.random.key(1), (2, first + second, DM))
  _, cache = prefill(params, kvattn.init_cache(2, 8, K, H), x[:, :first])
  before = jax.tree.map(np.array, cache)
  out, after = prefill(params, cache, x[:, first:])
  assert bool(kvattn.overflowed(after))
  for name in ("k", "v", "valid", "lengths", "index"):
    np.testing.assert_array_equal(getattr(after, name), getattr(before, name), err_msg=name)
  assert np.array(after.k).tobytes() == before.k.tobytes()
  # The overflowing call's output is still right: it attends without writing.
  ids = np.array([0] * first + [1] * second)
  want = reference.layer(params, x, jnp.ones(x.shape[:2], bool), ids)
  np.testing.assert_allclose(out, want[:, first:], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_overflow_is_sticky_even_when_the_next_write_fits():
  params = _params()
  x = jnp.ones((1, 6, DM))
  _, cache = kvattn.prefill(params, kvattn.init_cache(1, 8, K, H), x[:, :4])
  _, cache = kvattn.prefill(params, cache, x[:, :5])  # 4 + 5 > 8: refused.
  before = jax.tree.map(np.array, cache)
  _, cache = kvattn.decode_step(params, cache, x[:, :1])  # Would fit, but the row has a gap.
  assert bool(kvattn.overflowed(cache))
  np.testing.assert_array_equal(cache.k, before.k)
  assert int(cache.index) == 4


def test_decode_past_the_end_under_jit_keeps_the_newest_entries():
  """The data-loss trap: dynamic_update_slice would clamp and overwrite slot S-1."""
  params = _params()
  decode = jax.jit(kvattn.decode_step, donate_argnums=1)
  cache = kvattn.init_cache(1, 4, K, H)
  x = jax.random.normal(jax.random.key(2), (1, 6, DM))
  for t in range(4):
    _, cache = decode(params, cache, x[:, t:t + 1])
  full = np.array(cache.k)
  for t in range(4, 6):
    _, cache = decode(params, cache, x[:, t:t + 1])
  np.testing.assert_array_equal(cache.k, full)
  assert bool(kvattn.overflowed(cache)) and int(cache.index) == 4


def test_prompt_longer_than_cache_raises_at_trace_time():
  with pytest.raises(ValueError, match=r"T=9 new tokens, more than the cache's max_len S=8"):
    jax.jit(kvattn.prefill)(_params(), kvattn.init_cache(1, 8, K, H), jnp.ones((1, 9, DM)))


@pytest.mark.slow
def test_gradients_flow_through_a_bfloat16_cache():
  """The bfloat16 write on CPU goes through uint16 bits, which carry no derivative:
  its custom JVP writes the tangents by the same rule."""
  rng = np.random.default_rng(0)
  k1 = jnp.asarray(rng.standard_normal((1, 3, 1, 8)), jnp.float32)
  q2, k2 = (jnp.asarray(rng.standard_normal((1, 2, 1, 8)), jnp.float32) for _ in range(2))

  def loss(k1, dtype):
    _, cache = kvattn.cached_attention(k1, k1, k1, kvattn.init_cache(1, 8, 1, 8, dtype))
    o, _ = kvattn.cached_attention(q2, k2, k2, cache)
    return jnp.sum(o.astype(jnp.float32)**2)

  want = jax.grad(loss)(k1, jnp.float32)
  got = jax.grad(loss)(k1, jnp.bfloat16)
  assert float(jnp.abs(want).sum()) > 1.0
  np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1)


def test_a_cache_of_integers_other_than_int8_is_refused():
  cache = kvattn.init_cache(1, 4, K, H)
  bad = cache._replace(k=cache.k.astype(jnp.int32), v=cache.v.astype(jnp.int32))
  with pytest.raises(ValueError, match="cache.k dtype should be a floating dtype or int8: "
                     "but got int32"):
    kvattn.cached_attention(jnp.ones((1, 1, K, H)), jnp.ones((1, 1, K, H)), jnp.ones((1, 1, K, H)),
                            bad)
  with pytest.raises(ValueError, match="q dtype should be a floating dtype: but got int32"):
    kvattn.cached_attention(jnp.ones((1, 1, K, H), jnp.int32), jnp.ones((1, 1, K, H)),
                            jnp.ones((1, 1, K, H)), cache)
