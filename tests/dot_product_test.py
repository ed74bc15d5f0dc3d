"""Tests of dot_product_attention (attention.py, kernels/xla_training.py): outputs, gradients.

The oracles: the float64 numpy reference (tests/reference.py) for outputs; a
float64 jax.numpy route through the same maths (whole `[B, N, T, T]` logits,
GQA by `jnp.repeat`), differentiated by jax itself under `jax.enable_x64`,
for gradients; finite differences (`check_grads`); and the cached path on an
empty cache, whose numbers the function promises to share.

T = 11 is a multiple of no block size used, so the last block is padded;
blocks of 4 and 8 give several blocks, causal skipping included. The mask's
rows are left-padded, right-padded, holed, and all padding.
"""

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import reference

B, T, N, H = 4, 11, 4, 16
TOL = dict(rtol=2e-5, atol=2e-5)  # float32 outputs vs the float64 reference.
GRAD_TOL = dict(rtol=5e-5, atol=5e-5)  # float32 gradients vs float64 ones.


def random_qkv(seed, num_kv_heads, dtype=np.float32, t=T):
  """Random q [B, t, N, H], k, v [B, t, K, H] and a cotangent like q (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  draw = lambda heads: rng.standard_normal((B, t, heads, H)).astype(dtype)
  return draw(N), draw(num_kv_heads), draw(num_kv_heads), draw(N)


def padded_mask(t=T):
  """bool [4, t]: left-padded by 3, right-padded by 4, every third token a hole, all padding."""
  pos = np.arange(t)
  return np.stack([pos >= 3, pos < t - 4, pos % 3 != 1, np.zeros(t, bool)])


@functools.lru_cache(maxsize=None)
def _attention(causal, block_size):
  return jax.jit(
      functools.partial(kvattn.dot_product_attention, causal=causal, block_size=block_size))


@functools.lru_cache(maxsize=None)
def _grads(causal, block_size):
  """Jitted gradients of sum(o * ct) with respect to q, k and v."""
  def loss(q, k, v, mask, ct):
    o = kvattn.dot_product_attention(q, k, v, mask, causal=causal, block_size=block_size)
    return jnp.sum((o * ct).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def reference_attention(q, k, v, mask, causal):
  """float64 jax.numpy: q [B, T, N, H], k, v [B, T, K, H], mask [B, T] -> [B, T, N, H].

  Padded queries give zeros.
  """
  t, n, h = q.shape[1:]
  k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
  allowed = (mask[:, :, None] & mask[:, None, :])[:, None]  # [B, 1, T, T]
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(h)
  p = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1), 0.0)
  return jnp.einsum("BNTS,BSNH->BTNH", p, v)


def reference_grads(q, k, v, mask, ct, causal):
  """float64 gradients of sum(o * ct) with respect to q, k and v."""
  with jax.enable_x64(True):
    q, k, v, ct = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct))
    loss = lambda q, k, v: jnp.sum(reference_attention(q, k, v, jnp.asarray(mask), causal) * ct)
    return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]


def forward_reference(q, k, v, mask, causal):
  """The float64 numpy oracle: one call's tokens, causal or both ways."""
  return reference.attention_by_rows(q, k, v, mask, np.zeros(q.shape[1], int), prefix_lm=not causal)


def as_f64(x):
  return np.asarray(x).astype(np.float64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("block_size", [4, 8, None])
@pytest.mark.slow
def test_forward_matches_reference(causal, num_kv_heads, block_size):
  q, k, v, _ = random_qkv(num_kv_heads, num_kv_heads)
  mask = padded_mask()
  got = _attention(causal, block_size)(q, k, v, mask)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, forward_reference(q, k, v, mask, causal), **TOL)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("block_size", [4, None])
@pytest.mark.slow
def test_gradients_match_reference(causal, num_kv_heads, block_size):
  q, k, v, ct = random_qkv(10 + num_kv_heads, num_kv_heads)
  mask = padded_mask()
  got = _grads(causal, block_size)(q, k, v, mask, ct)
  want = reference_grads(q, k, v, mask, ct, causal)
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, w, err_msg=f"d{name}", **GRAD_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_16_bit_inputs_give_16_bit_outputs_and_gradients(dtype, causal):
  q, k, v, ct = random_qkv(20, 2, dtype)
  mask = padded_mask()
  # Computed in float32, then rounded once: to the dtype's precision.
  eps = float(jnp.finfo(dtype).eps)
  tol = dict(rtol=eps, atol=eps)
  got = _attention(causal, 4)(q, k, v, mask)
  assert got.dtype == dtype
  want = forward_reference(*(as_f64(x) for x in (q, k, v)), mask, causal)
  np.testing.assert_allclose(as_f64(got), want, **tol)
  grads = _grads(causal, 4)(q, k, v, mask, ct)
  want = reference_grads(q, k, v, mask, ct, causal)
  for name, g, w in zip("qkv", grads, want):
    assert g.dtype == dtype, name
    np.testing.assert_allclose(as_f64(g), w, err_msg=f"d{name}", **tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_check_grads(causal):
  rng = np.random.default_rng(30)
  q = jnp.asarray(rng.standard_normal((2, 6, 2, 4)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 6, 1, 4)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.bool_)
  f = jax.jit(
      functools.partial(kvattn.dot_product_attention, mask=mask, causal=causal, block_size=4))
  # Float32 finite differences: a large step, and tolerances to match.
  check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-2, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_reaches_real_tokens(causal):
  q, k, v, ct = random_qkv(40, 2)
  mask = padded_mask()
  poison = lambda x: np.where(mask[:, :, None, None], x, np.where(np.arange(H) % 2, np.nan, np.inf)
                             ).astype(np.float32)
  # The cotangent of a padded output row is never used either.
  args = [(q, k, v, mask, ct), (poison(q), poison(k), poison(v), mask, poison(ct))]
  (o,
   grads), (o_poisoned,
            grads_poisoned) = ((_attention(causal, 4)(*a[:4]), _grads(causal, 4)(*a)) for a in args)
  real = mask[:, :, None, None]
  np.testing.assert_array_equal(o_poisoned, o)
  assert np.all(np.asarray(o)[~mask] == 0.0)
  for name, g, g_poisoned in zip("qkv", grads, grads_poisoned):
    np.testing.assert_array_equal(g_poisoned, g, err_msg=f"d{name}")
    assert np.all(np.isfinite(g_poisoned)), name
    assert np.all(np.where(real, 0.0, np.asarray(g_poisoned)) == 0.0), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_matches_cached_attention_on_an_empty_cache(dtype, causal):
  """The promise: training and serving run the same numbers."""
  q, k, v, _ = random_qkv(50, 2, jnp.dtype(dtype))
  mask = padded_mask()
  cache = kvattn.init_cache(B, 32, 2, H, jnp.dtype(dtype))
  cached, _ = kvattn.cached_attention(q, k, v, cache, mask, prefix_lm=not causal,
                                      implementation="xla", block_q=4)
  got = _attention(causal, 4)(q, k, v, mask)
  assert got.dtype == cached.dtype
  np.testing.assert_allclose(as_f64(got), as_f64(cached), rtol=1e-6, atol=1e-6)


def test_jit_and_vmap():
  q, k, v, ct = random_qkv(60, 2)
  mask = padded_mask()
  attend = functools.partial(kvattn.dot_product_attention, causal=True, block_size=4)
  batched = jax.jit(jax.vmap(attend))(q[None], k[None], v[None], mask[None])
  np.testing.assert_allclose(batched[0], _attention(True, 4)(q, k, v, mask), rtol=1e-6, atol=1e-6)
  loss = lambda q, k, v: jnp.sum(jax.vmap(attend)(q, k, v, mask[None]) * ct[None])
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q[None], k[None], v[None])
  for g, want in zip(grads, _grads(True, 4)(q, k, v, mask, ct)):
    np.testing.assert_allclose(g[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gradients_under_shard_map():
  """Batch split over two devices: the backward's loop carries vary as their inputs do."""
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices("cpu")[:2])
  rows = NamedSharding(mesh, PartitionSpec("data"))
  q, k, v, ct = (jax.device_put(x, rows) for x in random_qkv(70, 2))
  mask = jax.device_put(padded_mask(), rows)
  grads = _grads(True, 4)
  sharded = jax.jit(
      jax.shard_map(grads, mesh=mesh, in_specs=PartitionSpec("data"),
                    out_specs=PartitionSpec("data")))
  for g, want in zip(sharded(q, k, v, mask, ct), grads(q, k, v, mask, ct)):
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)


def test_forward_mode_is_not_supported():
  """Documented: the gradient is a custom_vjp, reverse mode only."""
  q, k, v, _ = random_qkv(80, 2)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(kvattn.dot_product_attention, (q, k, v), (q, k, v))


@pytest.mark.slow
def test_gradient_memory_is_linear_in_length():
  """Blocks of 128: 4x the tokens, about 4x the temporaries, never 16x."""
  def temp_bytes(t):
    x = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(kvattn.dot_product_attention(q, k, v, block_size=128))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(2048) < 8 * temp_bytes(512)


@pytest.mark.parametrize("change, error, match", [
    (dict(q=np.zeros((B, T, N))), ValueError,
     r"q shape should be \(B, T, N, H\)=\(None, None, None, None\): but got \(4, 11, 4\)"),
    (dict(k=np.zeros((B, T + 1, 2, H))), ValueError,
     r"k shape should be \(B, T, K, H\)=\(4, 11, None, 16\): but got \(4, 12, 2, 16\)"),
    (dict(v=np.zeros((B, T, 1, H))), ValueError,
     r"v shape should be \(B, T, K, H\)=\(4, 11, 2, 16\): but got \(4, 11, 1, 16\)"),
    (dict(k=np.zeros((B, T, 3, H)), v=np.zeros(
        (B, T, 3, H))), ValueError, r"query heads N=4 should be a multiple of the kv heads K=3"),
    (dict(q=np.zeros((B, 0, N, H)), k=np.zeros((B, 0, 2, H)), v=np.zeros((B, 0, 2, H)), mask=None),
     ValueError, r"q shape should be \(B, T, N, H\) with T, N, H >= 1: but got \(4, 0, 4, 16\)"),
    (dict(q=np.zeros((B, T, N, H), np.int32)), ValueError,
     r"q dtype should be a floating dtype: but got int32"),
    (dict(mask=np.ones((B, T + 1), bool)), ValueError,
     r"mask shape should be \(B, T\)=\(4, 11\): but got \(4, 12\)"),
    (dict(mask=np.ones((B, T), np.int32)), ValueError, r"mask dtype should be bool: but got int32"),
    (dict(causal=np.bool_(True)), ValueError, r"causal should be a Python bool: but got "),
    (dict(causal=jnp.asarray(True)), ValueError, r"causal should be a Python bool: but got "),
    (dict(block_size=0), ValueError, r"block_size should be a positive int: but got 0"),
    (dict(block_size=4.0), ValueError, r"block_size should be a positive int: but got 4.0"),
])
def test_bad_inputs_raise(change, error, match):
  q, k, v, _ = random_qkv(90, 2)
  args = dict(q=q, k=k, v=v, mask=padded_mask()) | change
  with pytest.raises(error, match=match):
    kvattn.dot_product_attention(**args)


@pytest.mark.parametrize("block_size", [4, None])
@pytest.mark.slow
def test_sliding_window_forward_and_gradients_match_reference(block_size):
  """window=W: positions count real tokens, so a hole does not push a key out."""
  w = 3
  q, k, v, ct = random_qkv(40, 2, t=17)
  mask = padded_mask(17)
  m = mask.astype(np.int64)
  pos = np.cumsum(m, 1) - m
  allowed = (mask[:, :, None] & mask[:, None, :] & (pos[:, None, :] <= pos[:, :, None]) &
             (pos[:, None, :] > pos[:, :, None] - w))

  def reference_windowed(q, k, v):
    n, h = q.shape[2:]
    k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
    ok = jnp.asarray(allowed)[:, None]
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(h)
    p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, -1e30), axis=-1), 0.0)
    return jnp.einsum("BNTS,BSNH->BTNH", p, v)

  def loss(q, k, v):
    o = kvattn.dot_product_attention(q, k, v, mask, window=w, block_size=block_size)
    return jnp.sum(o * ct), o

  (_, got), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  with jax.enable_x64(True):
    q64, k64, v64, ct64 = (jnp.asarray(as_f64(x)) for x in (q, k, v, ct))
    want = reference_windowed(q64, k64, v64)
    want_grads = jax.grad(lambda *a: jnp.sum(reference_windowed(*a) * ct64),
                          argnums=(0, 1, 2))(q64, k64, v64)
    want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(got, want, **TOL)
  for g, w64 in zip(grads, want_grads):
    np.testing.assert_allclose(g, w64, **GRAD_TOL)
  with pytest.raises(ValueError, match="window should be None with causal=False"):
    kvattn.dot_product_attention(q, k, v, mask, causal=False, window=w)
