"""Tests of prefill and decode_step against the float64 reference.

The central invariant: prefill of T tokens == prefill of T - k then k decode
steps == chunked prefill in any split == full-sequence attention, for ragged
batches, GQA/MQA, prefix-LM and RoPE; and each row of a ragged batch equals
that row run alone.
"""

from hypothesis import given, settings, strategies as st
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import reference

DM, N, H = 16, 4, 8
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 kernel vs float64 reference.

# Jitted once per shape: far faster than eager dispatch for the many calls here.
prefill = jax.jit(kvattn.prefill, static_argnames=("rope_base",))
decode_step = jax.jit(kvattn.decode_step, static_argnames=("rope_base",))


def make_params(num_kv_heads, use_bias=True, seed=0):
  params = kvattn.init_params(jax.random.key(seed), DM, N, num_kv_heads=num_kv_heads, head_dim=H,
                              use_bias=use_bias)
  if use_bias:  # Random biases, so a bias that is ignored or misplaced shows.
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    for key, name in zip(keys, ("bq", "bk", "bv", "bo")):
      params[name] = 0.5 * jax.random.normal(key, params[name].shape)
  return params


def run_cached(params, x, mask, prompt_splits, num_decode, max_len, *, prefix_lm=False,
               rope_base=None, cache_dtype=jnp.float32):
  """Feeds x [B, P + D, DM] as prefill chunks (cut at prompt_splits) then D decode steps.

  Returns (out [B, P + D, DM], chunk_ids [P + D], final cache).
  """
  b, total, _ = x.shape
  prompt_len = total - num_decode
  kh = params["wk"].shape[1]
  cache = kvattn.init_cache(b, max_len, kh, H, cache_dtype)
  cuts = [0, *sorted(prompt_splits), prompt_len]
  outs, chunk_ids = [], []
  for c, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
    if hi == lo:
      continue
    o, cache = prefill(params, cache, x[:, lo:hi], mask[:, lo:hi], prefix_lm=prefix_lm,
                       rope_base=rope_base)
    outs.append(o)
    chunk_ids += [c] * (hi - lo)
  for d in range(num_decode):
    t = prompt_len + d
    o, cache = decode_step(params, cache, x[:, t:t + 1], rope_base=rope_base)
    outs.append(o)
    chunk_ids.append(len(cuts) + d)
  return jnp.concatenate(outs, axis=1), np.array(chunk_ids), cache


@st.composite
def scenarios(draw):
  # Few distinct shapes (each compiles once), many distinct contents.
  b = 3
  prompt_len = draw(st.integers(1, 6))
  return dict(
      b=b,
      prompt_len=prompt_len,
      num_decode=draw(st.integers(0, 2)),
      alone_row=draw(st.integers(0, b - 1)),
      lengths=draw(st.lists(st.integers(0, prompt_len), min_size=b, max_size=b)),
      left_pad=draw(st.booleans()),
      splits=draw(st.lists(st.integers(1, prompt_len), max_size=3)),
      num_kv_heads=draw(st.sampled_from([N, N // 2, 1])),
      prefix_lm=draw(st.booleans()),
      rope_base=draw(st.sampled_from([None, 10_000.0])),
      seed=draw(st.integers(0, 2**16)),
  )


@settings(max_examples=30, deadline=None)
@given(scenarios())
@pytest.mark.slow
def test_invariant_prefill_chunks_decode_equal_full_attention(sc):
  params = make_params(sc["num_kv_heads"], seed=sc["seed"])
  total = sc["prompt_len"] + sc["num_decode"]
  x = jax.random.normal(jax.random.key(sc["seed"]), (sc["b"], total, DM))
  prompt_mask = jnp.asarray(reference.ragged_mask(sc["lengths"], sc["prompt_len"], sc["left_pad"]))
  mask = jnp.concatenate([prompt_mask, jnp.ones((sc["b"], sc["num_decode"]), bool)], 1)
  kw = dict(prefix_lm=sc["prefix_lm"], rope_base=sc["rope_base"])
  max_len = 10

  chunked, chunk_ids, cache = run_cached(params, x, mask, sc["splits"], sc["num_decode"], max_len,
                                         **kw)
  want = reference.layer(params, x, mask, chunk_ids, **kw)
  np.testing.assert_allclose(chunked, want, **TOL)
  np.testing.assert_array_equal(cache.index, total)
  np.testing.assert_array_equal(cache.lengths, np.sum(mask, 1))
  assert not kvattn.overflowed(cache)

  # One-pass prefill of the prompt, then the same decode steps.
  one_pass, ids1, _ = run_cached(params, x, mask, [], sc["num_decode"], max_len, **kw)
  np.testing.assert_allclose(one_pass, reference.layer(params, x, mask, ids1, **kw), **TOL)
  if not sc["prefix_lm"]:  # Causal: how the prompt was split cannot matter.
    np.testing.assert_allclose(chunked, one_pass, rtol=1e-5, atol=1e-5)

  # A row alone, without padding, gives the same outputs at its real tokens.
  row = sc["alone_row"]
  real = np.nonzero(np.asarray(mask[row]))[0]
  if sc["lengths"][row]:
    alone, _, _ = run_cached(params, x[row:row + 1, real], jnp.ones((1, real.size), bool), [],
                             sc["num_decode"], max_len, **kw)
    np.testing.assert_allclose(alone[0], one_pass[row, real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [N, N // 2, 1])
def test_causal_prefill_equals_jax_dot_product_attention(num_kv_heads):
  """Oracle 2: jax.nn.dot_product_attention over the full sequence, no cache."""
  b, t = 2, 9
  params = make_params(num_kv_heads, use_bias=False)
  x = jax.random.normal(jax.random.key(3), (b, t, DM))
  cache = kvattn.init_cache(b, 16, num_kv_heads, H)
  out, cache = prefill(params, cache, x[:, :5])
  steps = [out]
  for i in range(5, t):
    o, cache = decode_step(params, cache, x[:, i:i + 1])
    steps.append(o)
  cached = jnp.concatenate(steps, axis=1)

  q = jnp.einsum("BTD,DNH->BTNH", x, params["wq"])
  k = jnp.einsum("BTD,DKH->BTKH", x, params["wk"])
  v = jnp.einsum("BTD,DKH->BTKH", x, params["wv"])
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  want = jnp.einsum("BTNH,NHD->BTD", o, params["wo"])
  np.testing.assert_allclose(cached, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, want[:, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_cache_close_to_float64():
  b, t = 2, 12
  params = make_params(2)
  x = jax.random.normal(jax.random.key(4), (b, t, DM))
  mask = jnp.asarray(reference.ragged_mask([12, 7], t, left_pad=True))
  out, ids, cache = run_cached(params, x, mask, [5], 0, 16, cache_dtype=jnp.bfloat16,
                               rope_base=10_000.0)
  assert cache.k.dtype == jnp.bfloat16 and out.dtype == jnp.float32
  want = reference.layer(params, x, mask, ids, rope_base=10_000.0)
  np.testing.assert_allclose(out, want, rtol=3e-2, atol=3e-2)


def test_bfloat16_inputs_give_bfloat16_output():
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), make_params(2))
  x = jax.random.normal(jax.random.key(5), (1, 4, DM), jnp.bfloat16)
  out, cache = prefill(params, kvattn.init_cache(1, 8, 2, H, jnp.bfloat16), x)
  assert out.dtype == jnp.bfloat16
  want = reference.layer(params, x, jnp.ones((1, 4), bool), np.zeros(4, int))
  np.testing.assert_allclose(out.astype(np.float32), want, rtol=5e-2, atol=5e-2)


def test_padding_rows_give_zeros_not_nan():
  params = make_params(2)
  x = jax.random.normal(jax.random.key(6), (2, 4, DM))
  mask = jnp.array([[False, False, False, False], [False, True, True, False]])
  out, cache = prefill(params, kvattn.init_cache(2, 8, 2, H), x, mask)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[1, [0, 3]], 0.0)
  np.testing.assert_array_equal(cache.lengths, [0, 2])
  np.testing.assert_array_equal(cache.valid[:, :4], mask)


def test_multi_turn_prefill_after_decode():
  """Prompt, decode, then a second prompt in the same cache: one long sequence."""
  params = make_params(1)
  x = jax.random.normal(jax.random.key(7), (1, 10, DM))
  cache = kvattn.init_cache(1, 12, 1, H)
  o1, cache = prefill(params, cache, x[:, :4], rope_base=500.0)
  o2, cache = decode_step(params, cache, x[:, 4:5], rope_base=500.0)
  o3, cache = prefill(params, cache, x[:, 5:], rope_base=500.0)
  got = jnp.concatenate([o1, o2, o3], 1)
  want = reference.layer(params, x, jnp.ones((1, 10), bool), np.arange(10), rope_base=500.0)
  np.testing.assert_allclose(got, want, **TOL)


def test_jit_compiles_once_for_every_index():
  params = make_params(2)
  traces = {"prefill": 0, "decode": 0}

  def counted_prefill(p, c, x, m):
    traces["prefill"] += 1
    return kvattn.prefill(p, c, x, m, rope_base=10_000.0)

  def counted_decode(p, c, x):
    traces["decode"] += 1
    return kvattn.decode_step(p, c, x, rope_base=10_000.0)

  jit_prefill = jax.jit(counted_prefill)
  jit_decode = jax.jit(counted_decode, donate_argnums=1)
  cache = kvattn.init_cache(2, 64, 2, H)
  x = jax.random.normal(jax.random.key(8), (2, 4, DM))
  mask = jnp.ones((2, 4), bool)
  for _ in range(5):
    _, cache = jit_prefill(params, cache, x, mask)
    for _ in range(3):
      _, cache = jit_decode(params, cache, x[:, :1])
  assert int(cache.index) == 5 * 4 + 5 * 3
  assert traces == {"prefill": 1, "decode": 1}
  assert jit_prefill._cache_size() == 1 and jit_decode._cache_size() == 1


def test_jaxpr_sees_the_index_as_a_traced_value():
  params = make_params(2)
  cache = kvattn.init_cache(1, 8, 2, H)
  x = jnp.ones((1, 1, DM))
  closed = jax.make_jaxpr(kvattn.decode_step)(params, cache, x)
  leaves = jax.tree.leaves((params, cache, x))
  position = [i for i, leaf in enumerate(leaves) if leaf is cache.index][0]
  index_var = closed.jaxpr.invars[position]
  assert not isinstance(index_var, jax_core.Literal)
  assert index_var.aval.shape == () and index_var.aval.dtype == jnp.int32
  # The index feeds the computation: some equation reads it.
  assert any(index_var in eqn.invars for eqn in closed.jaxpr.eqns)


def test_traced_prefix_lm_flag_matches_static():
  params = make_params(2)
  x = jax.random.normal(jax.random.key(9), (1, 5, DM))
  cache = kvattn.init_cache(1, 8, 2, H)
  static, _ = prefill(params, cache, x, prefix_lm=True)
  traced, _ = jax.jit(lambda f: prefill(params, cache, x, prefix_lm=f))(True)
  np.testing.assert_allclose(static, traced, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_vmap_over_independent_caches():
  params = make_params(2)
  caches = jax.vmap(lambda _: kvattn.init_cache(2, 8, 2, H))(jnp.arange(3))
  x = jax.random.normal(jax.random.key(10), (3, 2, 4, DM))
  out, caches = jax.vmap(kvattn.prefill, in_axes=(None, 0, 0))(params, caches, x)
  for i in range(3):
    want, _ = prefill(params, kvattn.init_cache(2, 8, 2, H), x[i])
    np.testing.assert_allclose(out[i], want, rtol=1e-6, atol=1e-6)
  assert caches.index.shape == (3,)


def test_scan_over_layers_with_stacked_caches():
  num_layers, b, t = 3, 2, 4
  layer_params = [make_params(2, seed=10 * i) for i in range(num_layers)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layer_params)
  caches = jax.tree.map(lambda *a: jnp.stack(a),
                        *[kvattn.init_cache(b, 8, 2, H) for _ in range(num_layers)])
  x = jax.random.normal(jax.random.key(11), (b, t, DM))

  def body(h, layer):
    p, c = layer
    o, c = prefill(p, c, h)
    return h + o, c

  got, caches = jax.jit(lambda x, c: jax.lax.scan(body, x, (stacked, c)))(x, caches)
  h = x
  for p in layer_params:
    o, _ = prefill(p, kvattn.init_cache(b, 8, 2, H), h)
    h = h + o
  np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(caches.index, [t] * num_layers)


# Errors: each names the argument, the expected shape and the actual one.


def _setup():
  params = make_params(2)
  cache = kvattn.init_cache(2, 8, 2, H)
  x = jnp.ones((2, 3, DM))
  return params, cache, x


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, c, x: (p, c, jnp.ones((2, 3, DM + 1))), r"x shape should be \(B, T, DM\)"),
        (lambda p, c, x: (p, c, jnp.ones((3, 3, DM))), r"x shape should be \(B, T, DM\)=\(2,"),
        (lambda p, c, x: (p, c, jnp.ones((2, 0, DM))), r"T >= 1"),
        (lambda p, c, x: (p, c, jnp.ones((2, DM))), r"x shape"),
        (lambda p, c, x: (p, c, [[[1.0] * DM] * 3] * 2),
         r"x shape should be \(B, T, DM\)=\(2, None, 16\): but got a Python list \(pass an array"),
        (lambda p, c, x: (p, c, jnp.ones((2, 9, DM))), r"max_len S=8"),
        (lambda p, c, x: ({
            **p, "wk": p["wk"][:, :1]
        }, c, x), r"params\['wk'\] shape should be"),
        (lambda p, c, x: ({
            **p, "wo": p["wo"][:, :, :3]
        }, c, x), r"params\['wo'\] shape should be"),
        (lambda p, c, x: ({
            **p, "bo": p["bo"][:3]
        }, c, x), r"params\['bo'\] shape should be"),
        (lambda p, c, x: ({
            **p, "wq": p["wq"][:, :3]
        }, c, x), r"query heads N=3 should be a multiple of the kv heads K="),
        (lambda p, c, x: ({
            **p, "wq": p["wq"][..., :4]
        }, c, x), r"params\['wq'\].*head_dim"),
        (lambda p, c, x: ({
            k: v for k, v in p.items() if k != "wv"
        }, c, x), r"missing \['wv'\]"),
        (lambda p, c, x: ({
            **p, "w_q": p["wq"]
        }, c, x), r"unknown keys \['w_q'\]"),
        # A cache of other kv heads or head size: the cache is blamed, not the params.
        (lambda p, c, x: (p, kvattn.init_cache(2, 8, 1, H), x),
         r"cache \(K, H\) should be params\['wk'\]'s \(DM, K, H\)=\(16, 2, 8\) K and H, \(2, 8\): "
         r"but got \(1, 8\)"),
        (lambda p, c, x: (p, kvattn.init_cache(2, 8, 2, 4), x), r"cache \(K, H\) should be .* but "
         r"got \(2, 4\)"),
        (lambda p, c, x: (p, c._replace(valid=c.valid[:1]), x), r"cache.valid shape"),
        (lambda p, c, x:
         (p, c._replace(index=c.index.astype(jnp.float32)), x), r"cache.index dtype"),
    ])
def test_prefill_errors_name_the_argument(mutate, match):
  params, cache, x = mutate(*_setup())
  with pytest.raises(ValueError, match=match):
    kvattn.prefill(params, cache, x)


@pytest.mark.parametrize("mask, match", [
    (np.ones((2, 4), bool), r"mask shape should be \(B, T\)=\(2, 3\): but got \(2, 4\)"),
    (np.ones((1, 3), bool), r"mask shape should be \(B, T\)=\(2, 3\): but got \(1, 3\)"),
    (np.ones((2, 3), np.int32), r"mask dtype should be bool: but got int32"),
])
def test_bad_mask_raises(mask, match):
  params, cache, x = _setup()
  with pytest.raises(ValueError, match=match):
    kvattn.prefill(params, cache, x, mask)


def test_token_ids_for_x_are_a_type_error():
  """An int x (token ids where activations belong) used to come out cast to int."""
  params, cache, x = _setup()
  ids = jnp.ones(x.shape, jnp.int32)
  with pytest.raises(
      ValueError, match=r"x dtype should be a floating dtype \(activations, not "
      r"token ids\): but got int32"):
    kvattn.prefill(params, cache, ids)
  with pytest.raises(ValueError, match=r"x dtype should be a floating dtype"):
    kvattn.decode_step(params, cache, ids[:, :1])
  with pytest.raises(ValueError, match=r"x dtype should be a floating dtype"):
    kvattn.self_attention(params, ids)


def test_decode_step_needs_one_token():
  params, cache, x = _setup()
  with pytest.raises(ValueError, match=r"x shape should be \(B, 1, DM\)"):
    kvattn.decode_step(params, cache, x)


def test_errors_raise_at_trace_time_under_jit():
  params, cache, x = _setup()
  with pytest.raises(ValueError, match="mask dtype"):
    jax.jit(kvattn.prefill)(params, cache, x, jnp.ones((2, 3), jnp.float32))


def test_non_cache_is_a_type_error():
  params, _, x = _setup()
  with pytest.raises(TypeError, match="cache should be a kvattn.KVCache"):
    kvattn.prefill(params, {"k": 1}, x)


@pytest.mark.slow
def test_bad_call_leaves_cache_untouched():
  params, cache, x = _setup()
  _, cache = kvattn.prefill(params, cache, x)
  before = jax.tree.map(np.array, cache)
  with pytest.raises(ValueError):
    kvattn.prefill(params, cache, x, jnp.ones((2, 3), jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, cache))


@pytest.mark.parametrize("implementation", [
    pytest.param(name, marks=pytest.mark.slow) if name == "pallas_gpu" else name
    for name in sorted(kvattn.attention.BACKENDS)
])
def test_implementation_argument_reaches_the_kernel(implementation):
  """prefill and decode_step pass `implementation` on; every one gives the reference."""
  params = make_params(2)
  x = jax.random.normal(jax.random.key(3), (2, 7, DM))
  mask = jnp.array([[True] * 7, [False, False] + [True] * 5])
  cache = kvattn.init_cache(2, 8, 2, H)
  step_prefill = jax.jit(kvattn.prefill, static_argnames=("rope_base", "implementation"))
  step_decode = jax.jit(kvattn.decode_step, static_argnames=("rope_base", "implementation"))
  out1, cache = step_prefill(params, cache, x[:, :6], mask[:, :6], rope_base=10_000.0,
                             implementation=implementation)
  out2, cache = step_decode(params, cache, x[:, 6:], rope_base=10_000.0,
                            implementation=implementation)
  want = reference.layer(params, x, mask, np.array([0] * 6 + [1]), rope_base=10_000.0)
  np.testing.assert_allclose(jnp.concatenate([out1, out2], 1), want, **TOL)


@pytest.mark.parametrize("poison", [np.nan, np.inf, 3e38])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.slow
def test_garbage_at_padding_never_reaches_a_real_token(poison, dtype):
  """NaN, inf or huge values in x at padding: real outputs finite and unchanged,
  in the prefill and in the decode steps after it."""
  params = make_params(2)
  x = np.asarray(jax.random.normal(jax.random.key(4), (3, 9, DM)))
  mask = np.ones((3, 9), bool)
  mask[0, :3] = False  # Left padding.
  mask[1, 4:6] = False  # Right padding of the prompt.
  mask[2, 1] = False  # A hole.
  dirty = x.copy()
  dirty[~mask] = poison
  outs = []
  for inputs in (x, dirty):
    cache = reference.new_cache(3, 12, 2, H, dtype)
    out, cache = prefill(params, cache, jnp.asarray(inputs[:, :6]), jnp.asarray(mask[:, :6]),
                         rope_base=10_000.0)
    pieces = [np.asarray(out)]
    for t in range(6, 9):
      out, cache = decode_step(params, cache, jnp.asarray(inputs[:, t:t + 1]), rope_base=10_000.0)
      pieces.append(np.asarray(out))
    outs.append(np.concatenate(pieces, 1))
  clean, got = outs
  assert np.all(np.isfinite(got[mask]))
  np.testing.assert_allclose(got[mask], clean[mask], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[~mask], 0.0)


@pytest.mark.parametrize("num_kv_heads", [N, 1])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_self_attention_equals_prefill_on_an_empty_cache(num_kv_heads, causal):
  """The layer without a cache: the same numbers as prefill, and a gradient."""
  params = make_params(num_kv_heads)
  x = jax.random.normal(jax.random.key(3), (2, 9, DM))
  mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [4]]))  # Left padding in row 1.
  scaling = kvattn.rope.Scaling("linear", 2.0)
  want, _ = kvattn.prefill(params, kvattn.init_cache(2, 12, num_kv_heads, H), x, mask,
                           prefix_lm=not causal, rope_base=100.0, rope_scaling=scaling)
  got = jax.jit(lambda p, x: kvattn.self_attention(p, x, mask, causal=causal, rope_base=100.0,
                                                   rope_scaling=scaling, block_size=4))(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(kvattn.self_attention(p, x, mask, causal=causal)**2))(params)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("call, error, match", [
    (lambda p, x: kvattn.self_attention(p, x[:, :, :5]), ValueError,
     r"x shape should be \(B, T, DM\)=\(None, None, 16\): but got \(2, 3, 5\)"),
    (lambda p, x: kvattn.self_attention({"wq": p["wq"]}, x), ValueError, r"params is missing"),
    (lambda p, x: kvattn.self_attention([p], x), TypeError, r"params should be a dict"),
    (lambda p, x: kvattn.self_attention(p, x, jnp.ones((2, 4), bool)), ValueError, r"mask"),
    (lambda p, x: kvattn.self_attention(p, x, rope_scaling=kvattn.rope.Scaling("linear", 2.0)),
     ValueError, r"rope_scaling needs a rope_base"),
])
def test_self_attention_errors_name_the_argument(call, error, match):
  params = make_params(N)
  with pytest.raises(error, match=match):
    call(params, jnp.ones((2, 3, DM)))


# --- The attention features of the 2026 families: a custom logit scale,
# logit soft-capping (Gemma 2), qk-norm per head (Qwen3, Gemma 3) or over the
# whole projection (OLMo 2), partial rotary (Phi) -----------------------------

FEATURES = dict(rope_base=10_000.0, rotary_dim=4, scale=0.3, softcap=2.0, qk_norm_eps=1e-5)


def _feature_params(qk_norm, seed=5):
  params = make_params(2, seed=seed)
  names = {"head": ("q_norm", "k_norm"), "projection": ("q_norm_proj", "k_norm_proj")}[qk_norm]
  shapes = {"q_norm": (H,), "k_norm": (H,), "q_norm_proj": (N, H), "k_norm_proj": (2, H)}
  for i, name in enumerate(names):  # Scales away from 1, so that a skipped norm shows.
    params[name] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed + 10 + i), shapes[name])
  return params


@pytest.mark.parametrize("implementation",
                         ["xla", pytest.param("pallas_gpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("qk_norm", ["head", "projection"])
@pytest.mark.parametrize("window", [None, 3])
def test_scale_softcap_qk_norm_and_partial_rotary_match_reference(implementation, qk_norm, window):
  """Chunks then decode steps, linear or ring cache, equal the float64 layer and self_attention.

  The logits reach well past the cap (x is large), so tanh bends them.
  """
  params = _feature_params(qk_norm)
  x = 3.0 * jax.random.normal(jax.random.key(6), (3, 9, DM))
  mask = np.ones((3, 9), bool)
  mask[1, :2] = False
  mask[2, 4] = False
  cache = kvattn.init_cache(3, 12, 2, H, window=window)
  step = jax.jit(kvattn.prefill, static_argnames=tuple(FEATURES) + ("implementation",))
  outs, ids = [], []
  for c, (lo, hi) in enumerate([(0, 5), (5, 7), (7, 8), (8, 9)]):
    o, cache = step(params, cache, x[:, lo:hi], mask[:, lo:hi], implementation=implementation,
                    **FEATURES)
    outs.append(o)
    ids += [c] * (hi - lo)
  want = reference.layer(params, x, mask, np.array(ids), window=window, **FEATURES)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, **TOL)
  whole = kvattn.self_attention(params, x, jnp.asarray(mask), window=window, **FEATURES)
  np.testing.assert_allclose(
      whole, reference.layer(params, x, mask, np.zeros(9, int), window=window, **FEATURES), **TOL)
  plain = reference.layer(params, x, mask, np.array(ids), window=window, rope_base=10_000.0)
  assert np.max(np.abs(want - plain)) > 0.1  # The features change the numbers.


def test_decode_step_takes_the_features():
  params = _feature_params("head")
  x = jax.random.normal(jax.random.key(7), (2, 4, DM))
  cache = kvattn.init_cache(2, 8, 2, H)
  _, cache = kvattn.prefill(params, cache, x[:, :3], **FEATURES)
  o, _ = kvattn.decode_step(params, cache, x[:, 3:], **FEATURES)
  want = reference.layer(params, x, np.ones((2, 4), bool), np.array([0, 0, 0, 1]), **FEATURES)
  np.testing.assert_allclose(o, want[:, 3:], **TOL)


def test_softcap_gradient_matches_dense_autodiff():
  """dot_product_attention's hand-written backward goes through the cap."""
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(3.0 * rng.standard_normal((2, 7, n, H)), jnp.float32) for n in (4, 2, 2))
  mask = jnp.asarray(rng.random((2, 7)) > 0.2).at[:, 0].set(True)
  cot = jnp.asarray(rng.standard_normal((2, 7, 4, H)), jnp.float32)

  def dense(q, k, v):
    kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kk) * 0.3
    logits = 2.0 * jnp.tanh(logits / 2.0)
    allowed = mask[:, None, None, :] & jnp.tril(jnp.ones((7, 7), bool))[None, None]
    p = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
    o = jnp.einsum("bnts,bsnh->btnh", p, vv)
    return jnp.sum(jnp.where(mask[:, :, None, None], o, 0.0) * cot)

  def ours(q, k, v):
    o = kvattn.dot_product_attention(q, k, v, mask, scale=0.3, softcap=2.0, block_size=3)
    return jnp.sum(o * cot)

  got, want = jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  plain = jax.grad(lambda q: jnp.sum(kvattn.dot_product_attention(q, k, v, mask) * cot))(q)
  assert np.max(np.abs(plain - got[0])) > 1e-2  # The cap and scale change the gradient.


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=0.0), r"scale should be None or a positive Python float: but got 0.0"),
    (dict(softcap=-1.0), r"softcap should be None or a positive Python float: but got -1.0"),
    (dict(softcap=jnp.float32(2.0)), r"softcap should be None or a positive Python float"),
    (dict(rotary_dim=4), r"rotary_dim needs a rope_base"),
    (dict(rope_base=1e4, rotary_dim=3), r"rotary_dim should be"),
    (dict(qk_norm_eps=0.0), r"qk_norm_eps should be a positive float: but got 0.0"),
])
def test_bad_feature_options_raise(kwargs, match):
  params = make_params(2)
  with pytest.raises(ValueError, match=match):
    kvattn.prefill(params, kvattn.init_cache(1, 4, 2, H), jnp.ones((1, 2, DM)), **kwargs)


def test_a_lone_or_mixed_qk_norm_is_refused():
  params = {**make_params(2), "q_norm": jnp.ones((H,))}
  with pytest.raises(ValueError, match=r"params should hold one qk-norm pair"):
    kvattn.prefill(params, kvattn.init_cache(1, 4, 2, H), jnp.ones((1, 2, DM)))
  params = {
      **_feature_params("head"), "q_norm_proj": jnp.ones((N, H)),
      "k_norm_proj": jnp.ones((2, H))
  }
  with pytest.raises(ValueError, match=r"params should hold one qk-norm pair"):
    kvattn.self_attention(params, jnp.ones((1, 2, DM)))
