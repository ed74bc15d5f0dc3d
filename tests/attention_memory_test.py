"""Memory of the jitted layer: no copy of a donated cache, temp memory independent of S.

XLA reports the buffers a compiled computation allocates: arguments, outputs,
outputs aliased to donated arguments, and temporaries. With the cache donated,
every cache output must alias its input, so the bytes allocated beyond the
donated cache (temp + output - alias) stay far below the cache's size, for
every storage dtype. (XLA:CPU computes bfloat16 in float32, and used to
convert a whole bfloat16 cache on every call.)
"""

import jax
import jax.numpy as jnp
import pytest

import kvattn
from tests import reference

B, DM, N, K, H = 2, 256, 4, 2, 64
DTYPES = ["float32", "bfloat16", "float16", "int8"]


def new_cache(max_len, dtype):
  return reference.new_cache(B, max_len, K, H, dtype)


def cache_bytes(cache):
  return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


def memory(fn, *args, donate=True):
  jitted = jax.jit(fn, donate_argnums=1 if donate else ())
  return jitted.lower(*args).compile().memory_analysis()


def extra_bytes(stats):
  """Bytes allocated beyond the donated arguments: temporaries and un-aliased outputs."""
  return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


@pytest.fixture(scope="module")
def params():
  return kvattn.init_params(jax.random.key(0), DM, N, num_kv_heads=K, head_dim=H)


def filled(params, cache, num_tokens):
  """The cache after a prefill of num_tokens: its index is above 0."""
  _, cache = jax.jit(kvattn.prefill)(params, cache, jnp.ones((B, num_tokens, DM)))
  assert int(cache.index) == num_tokens
  return cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, index", [(1, 0), (1, 5), (16, 0), (16, 5)])
@pytest.mark.slow
def test_donated_cache_is_not_copied(params, dtype, num_tokens, index):
  fn = kvattn.decode_step if num_tokens == 1 else kvattn.prefill
  cache = new_cache(16384, dtype)
  if index:
    cache = filled(params, cache, index)
  stats = memory(fn, params, cache, jnp.ones((B, num_tokens, DM)))
  # Every cache leaf aliases its input (the few bytes over are the output).
  assert stats.alias_size_in_bytes >= cache_bytes(cache) - 64
  # A copy of k or v alone would be about half the cache.
  assert extra_bytes(stats) < cache_bytes(cache) / 8, (extra_bytes(stats), cache_bytes(cache))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 256])
@pytest.mark.slow
def test_temp_memory_does_not_grow_with_max_len(params, dtype, num_tokens):
  """Temporaries are O(T * block): the same for a 16x larger cache, and far below
  the [B, N, T, S] logits of naive attention."""
  fn = kvattn.decode_step if num_tokens == 1 else kvattn.prefill
  x = jnp.ones((B, num_tokens, DM))
  temps = {
      max_len: memory(fn, params, new_cache(max_len, dtype), x).temp_size_in_bytes
      for max_len in (1024, 16384)
  }
  assert temps[16384] == temps[1024], temps
  naive_logits = B * N * num_tokens * 16384 * 4
  assert temps[16384] < max(naive_logits / 8, 1 << 20), temps


def test_without_donation_the_cache_is_copied(params):
  """The measure above detects a copy: without donation the output is a new cache."""
  cache = kvattn.init_cache(B, 4096, K, H)
  stats = memory(kvattn.decode_step, params, cache, jnp.ones((B, 1, DM)), donate=False)
  assert stats.alias_size_in_bytes == 0
  assert extra_bytes(stats) >= cache_bytes(cache)
