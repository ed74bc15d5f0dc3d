"""RoPE against the float64 numpy reference, and its defining property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn.rope import Scaling, apply_rope, inverse_frequencies
from tests import reference


def test_matches_float64_reference():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
  got = apply_rope(x, positions, 100.0)
  for b in range(2):
    want = reference.rope(np.asarray(x[b], np.float64), np.asarray(positions[b]), 100.0)
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_position_zero_is_identity():
  x = jax.random.normal(jax.random.key(1), (1, 1, 2, 4))
  np.testing.assert_allclose(apply_rope(x, jnp.zeros((1, 1), jnp.int32)), x, rtol=0, atol=0)


def test_dot_product_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))

  def score(m, n):
    rq = apply_rope(q, jnp.array([[m]]))
    rk = apply_rope(k, jnp.array([[n]]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), score(9, 9), rtol=1e-5)


def test_keeps_dtype():
  x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
  assert apply_rope(x, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.bfloat16


@pytest.mark.parametrize("x_shape, pos_shape, match", [
    ((1, 2, 1, 5), (1, 2), r"x shape should be \(B, T, N, H\) with H even: but got \(1, 2, 1, 5\)"),
    ((1, 2, 1, 4), (1, 3), r"positions shape should be \(B, T\)=\(1, 2\): but got \(1, 3\)"),
    ((2, 4), (2, 4), r"x shape should be \(B, T, N, H\): but got \(2, 4\)"),
])
def test_errors(x_shape, pos_shape, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.ones(x_shape), jnp.zeros(pos_shape, jnp.int32))


# numpy positions: a jax array built at import would start the backend before
# tests/conftest.py sets its flags (a test file runs as a script under Bazel).
@pytest.mark.parametrize("positions, base, error, match", [
    (np.zeros(
        (1, 2), np.float32), 10_000.0, ValueError, r"positions dtype should be an integer dtype"),
    (np.zeros(
        (1, 2), np.int32), True, ValueError, r"base should be a positive float: but got True"),
    (np.zeros(
        (1, 2), np.int32), -1.0, ValueError, r"base should be a positive float: but got -1.0"),
])
def test_bad_positions_or_base(positions, base, error, match):
  with pytest.raises(error, match=match):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.asarray(positions), base)


def test_numpy_and_jax_scalar_bases_are_accepted():
  x, positions = jnp.ones((1, 2, 1, 4)), jnp.array([[0, 5]])
  want = apply_rope(x, positions, 10_000.0)
  np.testing.assert_allclose(apply_rope(x, positions, np.float32(10_000.0)), want, rtol=1e-6)
  traced = jax.jit(lambda b: apply_rope(x, positions, b))(jnp.float32(10_000.0))
  np.testing.assert_allclose(traced, want, rtol=1e-5)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64
}


@pytest.mark.parametrize("hf_scaling, scaling", [
    (LLAMA3, Scaling("llama3", 8.0, 1.0, 4.0, 64)),
    ({
        "type": "linear",
        "factor": 4.0
    }, Scaling("linear", 4.0)),
])
def test_scaled_frequencies_match_float64_reference(hf_scaling, scaling):
  h = 32  # With base 500000 and an original length of 64, all three llama3 bands occur.
  want = reference.rope_frequencies(h, 500_000.0, hf_scaling)
  np.testing.assert_allclose(inverse_frequencies(h, 500_000.0, scaling), want, rtol=2e-6)
  assert not np.allclose(want, reference.rope_frequencies(h, 500_000.0))  # It scales.
  x = jax.random.normal(jax.random.key(4), (1, 6, 2, h))
  positions = jnp.array([[0, 3, 50, 200, 1000, 4000]])
  got = apply_rope(x, positions, 500_000.0, scaling)
  ref = reference.rope(np.asarray(x[0], np.float64), np.asarray(positions[0]), 500_000.0,
                       hf_scaling)
  np.testing.assert_allclose(got[0], ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("scaling, error, match", [
    ({
        "factor": 8.0
    }, TypeError, r"scaling should be None or a kvattn.rope.Scaling"),
    (Scaling("yarn", 8.0), ValueError, r"scaling.kind should be one of \('linear', 'llama3'\)"),
    (Scaling("linear",
             0.0), ValueError, r"scaling.factor should be a positive number: but got 0.0"),
    (Scaling("llama3", 8.0, 4.0, 1.0), ValueError, r"high_freq_factor > low_freq_factor"),
])
def test_bad_scaling(scaling, error, match):
  with pytest.raises(error, match=match):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 2), jnp.int32), 10_000.0, scaling)
