"""The XLA implementation (kvattn/kernels/xla.py): program size flat in the prompt length.

Its new-chunk attention loops over query blocks with a static trip count, so
a prompt of 8192 tokens compiles to the same program as one of 256: the same
jaxpr, and StableHLO of the same size. (It used to unroll a Python loop
per query block: 108 top-level equations at T=128, 2,066 at T=8192.)
Numerics are covered with every other implementation in
tests/attention_test.py.
"""

import jax
import jax.numpy as jnp
import pytest

import kvattn

B, DM, N, K, H = 1, 64, 4, 2, 16


def _prefill_program(t, prefix_lm):
  params = kvattn.init_params(jax.random.key(0), DM, N, num_kv_heads=K, head_dim=H)
  cache = kvattn.init_cache(B, 8192, K, H)
  x = jax.ShapeDtypeStruct((B, t, DM), jnp.float32)
  fn = lambda p, c, x: kvattn.prefill(p, c, x, prefix_lm=prefix_lm)
  jaxpr = jax.make_jaxpr(fn)(params, cache, x)
  lowered = jax.jit(fn).lower(params, cache, x).as_text()
  return len(jaxpr.eqns), len(lowered.splitlines())


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_program_size_does_not_grow_with_the_prompt(prefix_lm):
  short = _prefill_program(256, prefix_lm)
  long = _prefill_program(8192, prefix_lm)
  assert long[0] == short[0], (short, long)  # The same jaxpr.
  # StableHLO lines: equal up to how a version folds the shapes' constants.
  assert abs(long[1] - short[1]) <= 8, (short, long)


def test_one_query_block_needs_no_loop():
  """A decode step (T=1) has no query-block loop: one while loop, the cache's."""
  params = kvattn.init_params(jax.random.key(0), DM, N, num_kv_heads=K, head_dim=H)
  cache = kvattn.init_cache(B, 64, K, H)
  text = jax.jit(kvattn.decode_step).lower(params, cache, jnp.ones((B, 1, DM))).as_text()
  assert text.count("stablehlo.while") == 1
