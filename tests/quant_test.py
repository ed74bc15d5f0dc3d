"""Tests of the int8 cache: kvattn/quant.py and `init_cache(..., quantized=True)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn import quant
from tests import reference

B, DM, N, K, H = 2, 128, 4, 2, 32

prefill = jax.jit(kvattn.prefill, static_argnames=("rope_base",))
decode_step = jax.jit(kvattn.decode_step, static_argnames=("rope_base",))


def test_quantize_round_trip_error_is_half_a_step():
  x = np.random.default_rng(0).standard_normal((2, 5, 3, 16), np.float32) * 3
  x[0, 0, 0] = 0.0  # An all-zero vector.
  xq, scale = quant.quantize(jnp.asarray(x))
  assert xq.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (2, 5, 3)
  assert np.abs(np.asarray(xq, np.int32)).max() == 127
  np.testing.assert_array_equal(scale[0, 0, 0], 0.0)
  err = np.abs(np.asarray(quant.dequantize(xq, scale)) - x)
  assert np.all(err <= np.asarray(scale)[..., None] / 2 * (1 + 1e-5))
  np.testing.assert_array_equal(quant.dequantize(xq, scale)[0, 0, 0], 0.0)


def test_quantized_cache_layout_and_bytes():
  f32 = kvattn.init_cache(4, 256, 8, 64)
  i8 = kvattn.init_cache(4, 256, 8, 64, quantized=True)
  assert i8.quantized and not f32.quantized
  assert i8.k.dtype == i8.v.dtype == jnp.int8
  assert i8.k_scale.shape == i8.v_scale.shape == (4, 256, 8)
  assert f32.k_scale is None and f32.v_scale is None
  ratio = (sum(a.nbytes for a in jax.tree.leaves(i8)) / sum(a.nbytes for a in jax.tree.leaves(f32)))
  # int8 entries plus a float32 scale per 64 of them: (64 + 4) / 256 of float32.
  assert 0.25 < ratio < 0.28, ratio


@pytest.fixture(scope="module")
def params():
  return kvattn.init_params(jax.random.key(1), DM, N, num_kv_heads=K, head_dim=H)


def run(params, cache, x, prompt_len):
  """Prefill x[:, :prompt_len], then decode the rest one token at a time."""
  out, cache = prefill(params, cache, x[:, :prompt_len], rope_base=10_000.0)
  outs = [out]
  for i in range(prompt_len, x.shape[1]):
    out, cache = decode_step(params, cache, x[:, i:i + 1], rope_base=10_000.0)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


def test_int8_close_to_float32_attention(params):
  x = jax.random.normal(jax.random.key(2), (B, 24, DM))
  want, _ = run(params, kvattn.init_cache(B, 32, K, H), x, 20)
  got, cache = run(params, kvattn.init_cache(B, 32, K, H, quantized=True), x, 20)
  assert cache.quantized and int(cache.index) == 24
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 1e-2, rel
  ref = reference.layer(params, x, np.ones((B, 24), bool), np.r_[[0] * 20, 1:5], rope_base=10_000.0)
  np.testing.assert_allclose(got, ref, rtol=3e-2, atol=3e-2)


def test_int8_prefill_in_one_equals_prefill_then_decode(params):
  """New keys are quantised before they are attended to, in every route."""
  x = jax.random.normal(jax.random.key(3), (B, 24, DM))
  one_pass, cache1 = prefill(params, kvattn.init_cache(B, 32, K, H, quantized=True), x,
                             rope_base=10_000.0)
  stepped, cache2 = run(params, kvattn.init_cache(B, 32, K, H, quantized=True), x, 20)
  np.testing.assert_allclose(one_pass, stepped, rtol=1e-5, atol=1e-5)
  for name in ("k", "v"):  # The same entries, whichever route wrote them.
    np.testing.assert_array_equal(getattr(cache1, name), getattr(cache2, name))
    np.testing.assert_allclose(getattr(cache1, name + "_scale"), getattr(cache2, name + "_scale"),
                               rtol=1e-6)


def test_quantized_needs_float32_dtype():
  with pytest.raises(ValueError, match="dtype should be float32 when quantized=True"):
    kvattn.init_cache(1, 8, 1, 8, jnp.bfloat16, quantized=True)


def _cache():
  return kvattn.init_cache(2, 8, 2, 4, quantized=True)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c._replace(k_scale=None), r"cache.k_scale should be a float32 \(B, S, K\)"),
    (lambda c: c._replace(v_scale=c.v_scale[:, :4]),
     r"cache.v_scale shape should be \(B, S, K\)=\(2, 8, 2\): but got \(2, 4, 2\)"),
    (lambda c: c._replace(k_scale=c.k_scale.astype(jnp.bfloat16)),
     r"cache.k_scale dtype should be float32"),
    (lambda c: c._replace(v=c.v.astype(jnp.float32)),
     r"cache.v dtype should be cache.k.s, int8: but got float32"),
    (lambda c: kvattn.init_cache(2, 8, 2, 4)._replace(k_scale=c.k_scale),
     r"cache.k_scale should be None for a float32 cache"),
])
def test_malformed_quantized_cache_raises(mutate, match):
  q = jnp.ones((2, 1, 2, 4))
  with pytest.raises(ValueError, match=match):
    kvattn.cached_attention(q, q, q, mutate(_cache()))
