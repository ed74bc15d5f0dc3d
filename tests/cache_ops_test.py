"""Tests of rewind and reorder: the edited cache behaves as one built from the kept inputs.

The central invariant: feeding tokens, rewinding them and going on gives the
same cache and the same outputs as a run in which those tokens were padding
(never seen); reordering rows gives the cache of the reordered inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import reference

DM, N, K, H = 16, 4, 2, 8  # GQA: two query heads per kv head.
B, S = 3, 12
ROPE = 10_000.0
TOL = dict(rtol=1e-5, atol=1e-5)

prefill = jax.jit(kvattn.prefill, static_argnames=("rope_base",))
decode_step = jax.jit(kvattn.decode_step, static_argnames=("rope_base",))

# The calls of a run, as (tokens, mask): a ragged prompt (row 0 full, row 1
# left-padded, row 2 right-padded), 2 extra tokens with a hole in row 2, and 1
# decode step; then the continuation after the rewind: 2 tokens, 1 decode step.
PROMPT = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
EXTRA = np.array([[1, 1], [1, 1], [1, 0]], bool)
STEP = np.ones((B, 1), bool)
FED = np.concatenate([PROMPT, EXTRA, STEP], 1)  # [B, 9]: the slots before the rewind.
CONTINUATION = np.array([[1, 1], [0, 1], [1, 1]], bool)


def make_params(seed=0):
  params = kvattn.init_params(jax.random.key(seed), DM, N, num_kv_heads=K, head_dim=H,
                              use_bias=True)
  keys = jax.random.split(jax.random.key(seed + 1), 4)
  for key, name in zip(keys, ("bq", "bk", "bv", "bo")):  # Biases that would show if misplaced.
    params[name] = 0.5 * jax.random.normal(key, params[name].shape)
  return params


def feed(params, cache, x, masks):
  """Feeds x [B, T, DM] in calls of these masks; a single all-real token goes by decode_step."""
  outs, lo = [], 0
  for mask in masks:
    hi = lo + mask.shape[1]
    if mask.shape[1] == 1 and mask.all():
      out, cache = decode_step(params, cache, x[:, lo:hi], rope_base=ROPE)
    else:
      out, cache = prefill(params, cache, x[:, lo:hi], jnp.asarray(mask), rope_base=ROPE)
    outs.append(out)
    lo = hi
  return jnp.concatenate(outs, 1), cache


def kept_mask(fed, n):
  """fed [B, T] with the last n[b] real tokens of each row turned to padding."""
  kept = fed.copy()
  for b, count in enumerate(np.broadcast_to(n, (fed.shape[0],))):
    real = np.nonzero(fed[b])[0]
    kept[b, real[len(real) - count:] if count else []] = False
  return kept


def snapshot(cache):
  return jax.tree.map(np.array, cache)


def assert_trees_equal(got, want):
  jax.tree.map(np.testing.assert_array_equal, snapshot(got), snapshot(want))


@pytest.mark.parametrize(
    "dtype, n",
    [
        ("float32", 2),  # Row 2 keeps its prompt only.
        ("float32", [3, 0, 4]),  # Row 1 keeps all (index stays); row 2 loses prompt tokens too.
        ("float32", [3, 1, 2]),  # Every row ends earlier: index moves back.
        ("bfloat16", [3, 1, 2]),
        ("int8", [3, 1, 2]),
    ])
@pytest.mark.slow
def test_rewind_equals_a_run_that_never_saw_the_tokens(dtype, n):
  params = make_params()
  total = FED.shape[1] + CONTINUATION.shape[1] + 1
  x = jax.random.normal(jax.random.key(1), (B, total, DM))
  before, after = x[:, :FED.shape[1]], x[:, FED.shape[1]:]
  kept = kept_mask(FED, n)
  calls = (PROMPT.shape[1], EXTRA.shape[1], 1)

  def split(mask):
    return np.split(mask, np.cumsum(calls)[:-1], axis=1)

  _, cache = feed(params, reference.new_cache(B, S, K, H, dtype), before, split(FED))
  arg = n if isinstance(n, int) else jnp.asarray(n, jnp.int32)
  rewound = kvattn.rewind(cache, arg)
  _, unseen = feed(params, reference.new_cache(B, S, K, H, dtype), before, split(kept))

  # The cache itself: what a run without those tokens holds, but for the index.
  slots = np.arange(S)
  index = int(np.max(np.where(kept, slots[:FED.shape[1]] + 1, 0)))
  assert int(rewound.index) == index
  assert int(unseen.index) == FED.shape[1]
  np.testing.assert_array_equal(rewound.lengths, kept.sum(1))
  assert_trees_equal(rewound._replace(index=unseen.index), unseen)
  assert not kvattn.overflowed(rewound)

  # Going on: the same outputs, and the next write reuses the freed slots.
  next_masks = [CONTINUATION, np.ones((B, 1), bool)]
  got, rewound = feed(params, rewound, after, next_masks)
  want, _ = feed(params, unseen, after, next_masks)
  np.testing.assert_allclose(got, want, **TOL)
  assert int(rewound.index) == index + after.shape[1]
  np.testing.assert_array_equal(rewound.valid[:, index:index + 3], np.concatenate(next_masks, 1))
  np.testing.assert_array_equal(rewound.valid[:, index + 3:], False)

  if dtype == "float32":  # And the float64 reference of the kept tokens.
    mask = np.concatenate([kept] + next_masks, 1)
    ids = np.repeat(np.arange(5), list(calls) + [m.shape[1] for m in next_masks])
    ref = reference.layer(params, x, mask, ids, rope_base=ROPE)
    np.testing.assert_allclose(got, ref[:, FED.shape[1]:], rtol=1e-4, atol=1e-4)


def test_rewind_draws_the_documented_example():
  """The docstring's picture: the last n valid slots per row go, padding holes are skipped."""
  valid = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], bool)
  cache = kvattn.init_cache(2, 5, 1, 2)._replace(
      k=jnp.broadcast_to(jnp.asarray(valid, jnp.float32)[:, :, None, None], (2, 5, 1, 2)),
      valid=jnp.asarray(valid), lengths=jnp.array([4, 4], jnp.int32), index=jnp.int32(5))
  out = kvattn.rewind(cache, np.array([1, 2], np.int32))
  want = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(out.valid, want)
  np.testing.assert_array_equal(out.k[..., 0, 0], want.astype(np.float32))
  np.testing.assert_array_equal(out.lengths, [3, 2])
  assert int(out.index) == 4
  empty = kvattn.rewind(cache, 4)
  assert not np.any(empty.valid) and int(empty.index) == 0 and not np.any(empty.k)


def _filled_cache(dtype="float32"):
  params = make_params()
  x = jax.random.normal(jax.random.key(2), (B, FED.shape[1], DM))
  _, cache = prefill(params, reference.new_cache(B, S, K, H, dtype), x, jnp.asarray(FED),
                     rope_base=ROPE)
  return cache  # lengths [9, 7, 5], index 9.


@pytest.mark.slow
def test_rewind_compiles_once_for_every_n():
  cache = _filled_cache()
  # Two wrappers: jit objects of one function share their compilation cache.
  shared = jax.jit(lambda cache, n: kvattn.rewind(cache, n))
  per_row = jax.jit(lambda cache, n: kvattn.rewind(cache, n))
  for n in (0, 1, 4, 5):
    assert_trees_equal(shared(cache, jnp.int32(n)), kvattn.rewind(cache, n))
  for n in ([0, 1, 2], [9, 0, 5], [2, 7, 0]):
    assert_trees_equal(per_row(cache, jnp.array(n, jnp.int32)), kvattn.rewind(cache, n))
  assert shared._cache_size() == 1
  assert per_row._cache_size() == 1


def test_traced_n_is_clamped_to_what_each_row_holds():
  cache = _filled_cache()
  n = jnp.array([-2, 99, 3], jnp.int32)
  out = jax.jit(kvattn.rewind)(cache, n)
  # A negative count drops nothing, a count past the row empties it.
  assert_trees_equal(out, kvattn.rewind(cache, [0, 7, 3]))
  np.testing.assert_array_equal(cache.lengths - out.lengths, [0, 7, 3])  # What was dropped.


def test_rewind_of_stacked_caches_with_vmap():
  cache = _filled_cache()
  layers = [cache, cache._replace(k=2 * cache.k)]  # Two layers with different contents.
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  n = jnp.array([1, 0, 2], jnp.int32)
  got = jax.jit(jax.vmap(kvattn.rewind, in_axes=(0, None)))(stacked, n)
  eager = jax.vmap(kvattn.rewind, in_axes=(0, None))(stacked, 2)
  for i, layer in enumerate(layers):
    assert_trees_equal(jax.tree.map(lambda a: a[i], got), kvattn.rewind(layer, n))
    assert_trees_equal(jax.tree.map(lambda a: a[i], eager), kvattn.rewind(layer, 2))
  assert got.index.shape == (2,)


def test_rewind_and_reorder_take_any_pytree_of_caches():
  """A stack (leading L axis) and a tuple of a stack and a plain cache, as a model with
  local and global layers holds them: every layer edited as alone, eagerly and under jit;
  concrete counts are checked against every layer's lengths."""
  cache = _filled_cache()
  layers = [cache, cache._replace(k=2 * cache.k)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  tree = (stacked, {"global": cache._replace(v=-cache.v)})
  n, indices = jnp.array([1, 0, 2], jnp.int32), jnp.array([2, 2, 0], jnp.int32)
  for edit, arg in ((kvattn.rewind, n), (kvattn.reorder, indices)):
    for got in (edit(tree, arg), jax.jit(edit)(tree, arg)):
      for i, layer in enumerate(layers):
        assert_trees_equal(jax.tree.map(lambda a: a[i], got[0]), edit(layer, arg))
      assert_trees_equal(got[1]["global"], edit(tree[1]["global"], arg))
  with pytest.raises(ValueError, match=r"cache.lengths=\[9, 7, 5\]: but got 8"):
    kvattn.rewind(tree, 8)
  with pytest.raises(ValueError, match=r"indices should be in \[0, B\)=\[0, 3\)"):
    kvattn.reorder(tree, [0, 1, 3])
  # overflowed: one flag for the whole tree.
  assert not bool(kvattn.overflowed(tree))
  full = (stacked._replace(overflow=jnp.array([False, True])), {"global": cache})
  assert bool(kvattn.overflowed(full)) and kvattn.overflowed(full).shape == ()
  with pytest.raises(TypeError, match=r"cache should be a KVCache or a pytree of them"):
    kvattn.overflowed({"k": cache.k})


@pytest.mark.parametrize("n, error, match", [
    (8, ValueError, r"n should be at most the real tokens of each row, "
     r"cache.lengths=\[9, 7, 5\]: but got 8"),
    ([0, 0, 6], ValueError, r"cache.lengths=\[9, 7, 5\]: but got \[0, 0, 6\]"),
    (-1, ValueError, r"n should be non-negative: but got -1"),
    (np.array([1, -1, 0]), ValueError, r"n should be non-negative: but got \[1, -1, 0\]"),
    (jnp.ones((2,), jnp.int32), ValueError, r"n shape should be \(\) or \(B,\)=\(3,\): "
     r"but got \(2,\)"),
    (jnp.ones((3, 1), jnp.int32), ValueError, r"n shape should be \(\) or \(B,\)"),
    (1.0, ValueError, r"n dtype should be an integer dtype such as int32: but got float"),
    (jnp.ones((3,), jnp.float32), ValueError, r"n dtype should be an integer dtype"),
    (True, ValueError, r"n dtype should be an integer dtype such as int32: but got bool"),
])
def test_rewind_bad_n_raises_and_leaves_the_cache(n, error, match):
  cache = _filled_cache()
  before = snapshot(cache)
  with pytest.raises(error, match=match):
    kvattn.rewind(cache, n)
  kvattn.rewind(cache, 1)
  assert_trees_equal(cache, before)


def test_rewind_errors_under_jit():
  cache = _filled_cache()
  # A static n is checked even when the lengths are traced: never more than S.
  with pytest.raises(ValueError, match=r"n should be at most the cache's max_len S=12: but got 13"):
    jax.jit(lambda c: kvattn.rewind(c, 13))(cache)
  with pytest.raises(ValueError, match=r"n should be non-negative"):
    jax.jit(lambda c: kvattn.rewind(c, -1))(cache)
  with pytest.raises(
      TypeError, match=r"cache should be a KVCache or a pytree whose leaves are "
      r"all in KVCaches: but got ArrayImpl"):
    kvattn.rewind({"k": cache.k}, 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_reorder_equals_the_cache_of_reordered_inputs(dtype):
  params = make_params()
  indices = np.array([2, 0, 0], np.int32)
  x = jax.random.normal(jax.random.key(3), (B, 7, DM))
  mask = jnp.asarray(FED[:, :6])
  _, cache = prefill(params, reference.new_cache(B, S, K, H, dtype), x[:, :6], mask, rope_base=ROPE)
  _, want = prefill(params, reference.new_cache(B, S, K, H, dtype), x[indices, :6], mask[indices],
                    rope_base=ROPE)
  reorder = jax.jit(lambda cache, indices: kvattn.reorder(cache, indices))
  got = reorder(cache, jnp.asarray(indices))
  assert_trees_equal(got, want)
  assert_trees_equal(kvattn.reorder(cache, indices), want)
  out, _ = decode_step(params, got, x[:, 6:], rope_base=ROPE)
  out_want, _ = decode_step(params, want, x[:, 6:], rope_base=ROPE)
  np.testing.assert_allclose(out, out_want, **TOL)
  reorder(cache, jnp.array([1, 1, 2], jnp.int32))
  assert reorder._cache_size() == 1


def test_reorder_of_stacked_caches_with_vmap():
  cache = _filled_cache()
  layers = [cache, cache._replace(v=-cache.v)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  indices = jnp.array([1, 2, 1], jnp.int32)
  got = jax.vmap(kvattn.reorder, in_axes=(0, None))(stacked, indices)
  for i, layer in enumerate(layers):
    assert_trees_equal(jax.tree.map(lambda a: a[i], got), kvattn.reorder(layer, indices))


def test_traced_indices_are_clamped():
  cache = _filled_cache()
  got = jax.jit(kvattn.reorder)(cache, jnp.array([-1, 5, 1], jnp.int32))
  assert_trees_equal(got, kvattn.reorder(cache, [0, 2, 1]))


@pytest.mark.parametrize("indices, error, match", [
    ([3, 0, 0], ValueError, r"indices should be in \[0, B\)=\[0, 3\): but got \[3, 0, 0\]"),
    (np.array([-1, 0, 0]), ValueError, r"indices should be in \[0, B\)"),
    (jnp.array([0, 1], jnp.int32), ValueError, r"indices shape should be \(B,\)=\(3,\): "
     r"but got \(2,\)"),
    (0, ValueError, r"indices shape should be \(B,\)=\(3,\): but got \(\)"),
    (jnp.zeros((3,), jnp.float32), ValueError, r"indices dtype should be an integer dtype"),
])
def test_reorder_bad_indices_raise(indices, error, match):
  cache = _filled_cache()
  before = snapshot(cache)
  with pytest.raises(error, match=match):
    kvattn.reorder(cache, indices)
  assert_trees_equal(cache, before)
