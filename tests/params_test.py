"""init_params: shapes, GQA, biases, and its argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn


def test_shapes_follow_flax_dense_general_layout():
  p = kvattn.init_params(jax.random.key(0), 32, 8, num_kv_heads=2, head_dim=16, use_bias=True)
  assert {
      k: v.shape for k, v in p.items()
  } == {
      "wq": (32, 8, 16),
      "wk": (32, 2, 16),
      "wv": (32, 2, 16),
      "wo": (8, 16, 32),
      "bq": (8, 16),
      "bk": (2, 16),
      "bv": (2, 16),
      "bo": (32,)
  }


def test_defaults_and_dtype():
  p = kvattn.init_params(jax.random.key(0), 32, 4, dtype=jnp.bfloat16)
  assert p["wk"].shape == (32, 4, 8) and p["wq"].dtype == jnp.bfloat16
  assert "bq" not in p


def test_kernel_scale_is_lecun_normal():
  p = kvattn.init_params(jax.random.key(1), 256, 8)
  np.testing.assert_allclose(np.std(p["wq"]), 256**-0.5, rtol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), "query heads N=4 should be a multiple of the kv heads K=3"),
    (dict(head_dim=0), "head_dim should be a positive int: but got 0"),
])
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kvattn.init_params(jax.random.key(0), 16, 4, **kwargs)
