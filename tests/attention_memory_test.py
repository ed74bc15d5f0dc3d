"""Memory of the jitted layer: no copy of a donated cache, prefill temp O(T * block).

XLA reports the buffers a compiled computation allocates: arguments, outputs,
outputs aliased to donated arguments, and temporaries. With the cache donated,
every cache output must alias its input, so the bytes allocated beyond the
donated cache (temp + output - alias) stay far below the cache's size.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn

B, DM, N, K, H = 2, 256, 4, 2, 64


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


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_donated_cache_is_not_copied(params, quantized, num_tokens):
  fn = kvattn.decode_step if num_tokens == 1 else kvattn.prefill
  cache = kvattn.init_cache(B, 16384, K, H, quantized=quantized)
  stats = memory(fn, params, cache, jnp.ones((B, num_tokens, DM)))
  # Every cache leaf aliases its input (the few bytes over are the output).
  assert stats.alias_size_in_bytes >= cache_bytes(cache) - 64
  # A copy of k or v alone would be about half the cache.
  assert extra_bytes(stats) < cache_bytes(cache) / 8, (extra_bytes(stats), cache_bytes(cache))


def test_without_donation_the_cache_is_copied(params):
  """The measure above detects a copy: without donation the output is a new cache."""
  cache = kvattn.init_cache(B, 4096, K, H)
  stats = memory(kvattn.decode_step, params, cache, jnp.ones((B, 1, DM)), donate=False)
  assert stats.alias_size_in_bytes == 0
  assert extra_bytes(stats) >= cache_bytes(cache)


def test_prefill_temp_does_not_grow_with_max_len(params):
  """Temporaries are O(T * block): the same for a 16x larger cache, and far below
  the [B, N, T, S] logits of naive attention."""
  t = 256
  x = jnp.ones((B, t, DM))
  temps = {}
  for max_len in (1024, 16384):
    stats = memory(kvattn.prefill, params, kvattn.init_cache(B, max_len, K, H), x)
    temps[max_len] = stats.temp_size_in_bytes
  assert temps[16384] == temps[1024], temps
  naive_logits = B * N * t * 16384 * 4
  assert temps[16384] < naive_logits / 8, temps


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
