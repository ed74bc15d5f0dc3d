"""Tests of sliding-window ring caches (`init_cache(..., window=W)`) against float64.

The invariant: a ring of W (+ rewind_room) slots gives the attention of the
whole sequence under the sliding-window mask, on sequences many times longer
than W, whether fed in one pass, in chunks longer or shorter than W, or by
decode steps; ragged rows, GQA, RoPE at the true positions, int8 and
bfloat16. Then rewind, reorder, overflow, and a long run at constant memory.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from tests import compiles
from tests import reference

DM, N, K, H = 16, 4, 2, 8
W = 6
ROPE = 10_000.0
TOL = dict(rtol=1e-4, atol=1e-4)

prefill = jax.jit(kvattn.prefill, static_argnames=("rope_base",))
decode_step = jax.jit(kvattn.decode_step, static_argnames=("rope_base",))


def _params(seed=0):
  return kvattn.init_params(jax.random.key(seed), DM, N, num_kv_heads=K, head_dim=H, use_bias=True)


def _inputs(b, t, seed=0):
  """x [B, T, DM] and a ragged mask: row 0 full, row 1 with holes, row 2 left-padded."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, t, DM)).astype(np.float32)
  mask = np.ones((b, t), bool)
  if b > 1:
    mask[1] = rng.random(t) > 0.3
  if b > 2:
    mask[2, :t // 3] = False
  return x, mask


def _run(params, cache, x, mask, sizes):
  """Feeds x in calls of `sizes` tokens (1: decode_step when the row is all real)."""
  outs, lo = [], 0
  for size in sizes:
    xs, ms = x[:, lo:lo + size], mask[:, lo:lo + size]
    if size == 1 and ms.all():
      o, cache = decode_step(params, cache, jnp.asarray(xs), rope_base=ROPE)
    else:
      o, cache = prefill(params, cache, jnp.asarray(xs), jnp.asarray(ms), rope_base=ROPE)
    outs.append(np.asarray(o, np.float32))
    lo += size
  return np.concatenate(outs, 1), cache


def _chunk_ids(sizes):
  return np.concatenate([np.full(size, i) for i, size in enumerate(sizes)])


@pytest.mark.parametrize("sizes", [[60], [4, 17, 1, 1, 9, 28], [7] * 8 + [4], [1] * 60],
                         ids=["one_pass", "chunks_longer_and_shorter", "chunks", "steps"])
@pytest.mark.parametrize("rewind_room", [0, 3])
@pytest.mark.slow
def test_ring_equals_sliding_window_attention(sizes, rewind_room):
  params = _params()
  x, mask = _inputs(3, 60)
  if sizes == [1] * 60:
    mask[:] = True  # Decode steps: one real token per row and call.
  cache = kvattn.init_cache(3, 100, K, H, window=W, rewind_room=rewind_room)
  got, cache = _run(params, cache, x, mask, sizes)
  want = reference.layer(params, x, mask, _chunk_ids(sizes), rope_base=ROPE, window=W)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(got[~mask], 0.0)
  assert cache.k.shape == (3, W + rewind_room, K, H)  # Memory independent of the length.
  np.testing.assert_array_equal(cache.lengths, mask.sum(1))
  assert not bool(cache.overflow)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 3e-2), ("int8", 3e-2)])
@pytest.mark.slow
def test_ring_in_bfloat16_and_int8(dtype, tol):
  params = _params(1)
  x, mask = _inputs(3, 30, seed=1)
  sizes = [5, 11, 1, 13]
  cache = kvattn.init_cache(3, 50, K, H, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                            quantized=dtype == "int8", window=W)
  assert cache.k.dtype == dtype
  got, _ = _run(params, cache, x, mask, sizes)
  want = reference.layer(params, x, mask, _chunk_ids(sizes), rope_base=ROPE, window=W)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.slow
def test_window_wider_than_the_sequence_is_plain_causal_attention():
  params = _params(2)
  x, mask = _inputs(3, 12, seed=2)
  ring, _ = _run(params, kvattn.init_cache(3, 12, K, H, window=64), x, mask, [5, 7])
  linear, _ = _run(params, kvattn.init_cache(3, 12, K, H), x, mask, [5, 7])
  np.testing.assert_allclose(ring, linear, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_positions_past_max_len_overflow_and_write_nothing():
  params = _params()
  x, mask = _inputs(2, 12)
  mask[:] = True
  cache = kvattn.init_cache(2, 10, K, H, window=4)
  _, cache = _run(params, cache, x, mask, [8])
  before = cache
  _, cache = _run(params, cache, x[:, 8:], mask[:, 8:], [3])  # Positions 8..10: past 10.
  assert bool(cache.overflow)
  for a, b in zip(jax.tree.leaves(before._replace(overflow=None)),
                  jax.tree.leaves(cache._replace(overflow=None))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_ten_thousand_decode_steps_one_compilation_constant_memory():
  params = kvattn.init_params(jax.random.key(3), DM, N, num_kv_heads=K, head_dim=H)
  w, steps = 256, 10_000
  xs = jax.random.normal(jax.random.key(4), (steps, 1, 1, DM))
  step = jax.jit(lambda c, x: kvattn.decode_step(params, c, x, rope_base=ROPE), donate_argnums=0)
  cache = kvattn.init_cache(1, steps, K, H, window=w)
  outs = []
  with compiles.compilations("<lambda>") as compiled:
    for i in range(steps):
      o, cache = step(cache, xs[i])
      if i == 0:
        live = sum(a.nbytes for a in jax.live_arrays())
      if i >= steps - 3:
        outs.append(np.asarray(o[0, 0]))
  assert len(compiled) == 1, compiled
  assert sum(a.nbytes for a in jax.live_arrays()) <= live + 3 * DM * 4
  assert cache.k.shape == (1, w, K, H) and int(cache.lengths[0]) == steps
  # The last 3 outputs against float64 over the window each one sees.
  x = np.asarray(xs[:, 0, 0], np.float64)  # [steps, DM]
  p = {name: np.asarray(a, np.float64) for name, a in params.items()}
  for j, out in zip(range(steps - 3, steps), outs):
    lo = j - w + 1
    pos = np.arange(lo, j + 1)
    q = reference.rope(np.einsum("ld,dnh->lnh", x[j:j + 1], p["wq"]), pos[-1:], ROPE)
    k = reference.rope(np.einsum("ld,dnh->lnh", x[lo:j + 1], p["wk"]), pos, ROPE)
    v = np.einsum("ld,dnh->lnh", x[lo:j + 1], p["wv"])
    kk, vv = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
    logits = np.einsum("nh,lnh->nl", q[0], kk) / np.sqrt(H)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("nl,lnh->nh", probs, vv)
    np.testing.assert_allclose(out, np.einsum("nh,nhd->d", o, p["wo"]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [2, np.array([0, 3, 1])], ids=["shared", "per_row"])
@pytest.mark.slow
def test_rewind_within_the_room_equals_never_seeing_the_tokens(n):
  params = _params(5)
  x, mask = _inputs(3, 40, seed=5)
  counts = np.broadcast_to(n, (3,))
  cache = kvattn.init_cache(3, 80, K, H, window=W, rewind_room=2)
  _, cache = _run(params, cache, x, mask, [30])
  cache = kvattn.rewind(cache, n)
  # The same rows without their last `counts` real tokens of the 30 fed.
  kept = mask[:, :30].copy()
  for b in range(3):
    real = np.nonzero(kept[b])[0]
    kept[b, real[len(real) - counts[b]:]] = False
  want_cache = kvattn.init_cache(3, 80, K, H, window=W, rewind_room=2)
  _, want_cache = _run(params, want_cache, x[:, :30], kept, [30])
  more = np.ones((3, 10), bool)
  got, _ = _run(params, cache, x[:, 30:], more, [4, 1, 5])
  want, _ = _run(params, want_cache, x[:, 30:], more, [4, 1, 5])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not bool(cache.overflow)


@pytest.mark.slow
def test_rewind_past_the_room_raises_or_sets_overflow():
  params = _params()
  x, mask = _inputs(2, 20)
  cache = kvattn.init_cache(2, 40, K, H, window=W, rewind_room=1)
  _, cache = _run(params, cache, x, mask, [20])
  kvattn.rewind(cache, 2)  # rewind_room + 1: still exact.
  with pytest.raises(ValueError, match=r"n should be at most rewind_room \+ 1 = 2"):
    kvattn.rewind(cache, 3)
  traced = jax.jit(kvattn.rewind)(cache, jnp.int32(3))
  assert bool(traced.overflow)
  assert not bool(jax.jit(kvattn.rewind)(cache, jnp.int32(2)).overflow)


def test_reorder_equals_the_reordered_inputs():
  params = _params(6)
  x, mask = _inputs(3, 25, seed=6)
  idx = np.array([2, 0, 0])
  cache = kvattn.init_cache(3, 50, K, H, window=W)
  _, cache = _run(params, cache, x, mask, [25])
  got = kvattn.reorder(cache, idx)
  want = kvattn.init_cache(3, 50, K, H, window=W)
  _, want = _run(params, want, x[idx], mask[idx], [25])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_second_rewind_counts_what_the_first_dropped():
  """After a rewind the ring holds fewer than S tokens: the next rewind must know."""
  params = _params()
  x, mask = _inputs(2, 10)
  mask[:] = True
  cache = kvattn.init_cache(2, 40, K, H, window=4)
  _, cache = _run(params, cache, x, mask, [10])
  once = kvattn.rewind(cache, 1)
  with pytest.raises(ValueError, match=r"n should be at most rewind_room \+ 1"):
    kvattn.rewind(once, 1)
  assert bool(jax.jit(kvattn.rewind)(once, jnp.int32(1)).overflow)
  # Refilled, the ring may be rewound again, exactly.
  _, refilled = _run(params, once, x[:, :2], mask[:, :2], [2])
  again = kvattn.rewind(refilled, 1)
  assert not bool(again.overflow)
  emptied = jax.jit(kvattn.rewind)(cache, jnp.int32(10))  # Nothing left to need.
  assert not bool(emptied.overflow)


@pytest.mark.parametrize("implementation, block",
                         [("xla", 4), ("xla", None),
                          pytest.param("pallas_gpu", 5, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_blocks_of_the_ring_and_the_chunk(implementation, block):
  """Kernel level, small blocks: the ring's blocks (the last overlapping), block skipping
  by positions in a chunk, chunks of 8 times the ring, holes and left padding; the
  Pallas kernels in interpret mode."""
  rng = np.random.default_rng(9)
  b, t, n, kh, h, w = 3, 48 if implementation == "pallas_gpu" else 64, 4, 2, 8, 6
  q = rng.standard_normal((b, t, n, h)).astype(np.float32)
  k = rng.standard_normal((b, t, kh, h)).astype(np.float32)
  v = rng.standard_normal((b, t, kh, h)).astype(np.float32)
  mask = rng.random((b, t)) > 0.3
  mask[0], mask[2, :20] = True, False
  want = np.zeros(q.shape)
  for row in range(b):
    idx = np.nonzero(mask[row])[0]
    pos = np.arange(idx.size)
    allowed = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - w)
    want[row, idx] = reference.attention(q[row, idx], k[row, idx], v[row, idx], allowed)
  attend = jax.jit(functools.partial(kvattn.cached_attention, implementation=implementation),
                   static_argnames=("block_q", "block_kv"))
  for sizes in ([t], [3, t - 19, 1, 15]):
    cache = kvattn.init_cache(b, 100, kh, h, window=w, rewind_room=1)
    outs, lo = [], 0
    for size in sizes:
      sl = slice(lo, lo + size)
      o, cache = attend(q[:, sl], k[:, sl], v[:, sl], cache, mask[:, sl], block_q=block,
                        block_kv=block)
      outs.append(np.asarray(o))
      lo += size
    np.testing.assert_allclose(np.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)


def test_a_window_wider_than_max_len_takes_max_len_slots():
  assert kvattn.init_cache(1, 16, K, H, window=64, rewind_room=4).k.shape == (1, 16, K, H)


@pytest.mark.parametrize(
    "windows",
    [dict(window_pattern=(4,)), dict(window_pattern=(4, None))],
    ids=["all_local", "local_and_global"])
@pytest.mark.slow
def test_generate_and_speculative_decoding_on_rings(windows):
  """Buckets apply (padding takes no ring slot); speculative decoding rewinds exactly
  with rewind_room = k - 1, and is refused with less."""
  from kvattn.models import transformer
  config = transformer.Config(vocab_size=32, num_layers=2, d_model=DM, num_heads=N, num_kv_heads=K,
                              head_dim=H, d_ff=32, rope_base=ROPE, norm="rms_norm", **windows)
  params = transformer.init_params(jax.random.key(0), config)
  step = transformer.step_fn(config)
  tokens = np.array([[3, 5, 7, 9, 11]], np.int32)
  mask = np.ones(tokens.shape, bool)
  kw = dict(max_new_tokens=12, sampler=kvattn.sampling.Sampler(), key=jax.random.key(1))
  plain = kvattn.generate(step, params, transformer.init_caches(config, 1, 64), tokens, mask,
                          prompt_buckets=None, **kw)
  with compiles.compilations("start") as compiled:
    bucketed = kvattn.generate(step, params, transformer.init_caches(config, 1, 64), tokens, mask,
                               **kw)
  np.testing.assert_array_equal(bucketed.tokens, plain.tokens)
  overflow = [
      np.asarray(c.overflow)
      for c in jax.tree.leaves(bucketed.caches, is_leaf=lambda x: isinstance(x, kvattn.KVCache))
  ]
  assert len(compiled) == 1 and not np.any(np.concatenate(overflow))
  k = 3
  caches = lambda room: transformer.init_caches(config, 1, 64, rewind_room=room)
  got, _ = kvattn.speculative.speculative_generate(step, params, caches(k - 1), step, params,
                                                   caches(k - 1), tokens, mask, max_new_tokens=12,
                                                   num_draft=k)
  np.testing.assert_array_equal(got, plain.tokens)
  with pytest.raises(ValueError, match=r"rewind_room should be at least 2 to rewind 3"):
    kvattn.speculative.speculative_generate(step, params, caches(0), step, params, caches(0),
                                            tokens, mask, max_new_tokens=12, num_draft=k)


@pytest.mark.parametrize("call, match", [
    (lambda: kvattn.init_cache(1, 8, K, H, window=0), r"window should be a positive int"),
    (lambda: kvattn.init_cache(1, 8, K, H, rewind_room=2), r"rewind_room should be 0 without"),
    (lambda: kvattn.init_cache(1, 8, K, H, window=4, rewind_room=-1),
     r"rewind_room should be a non-negative int"),
    (lambda: kvattn.prefill(_params(), kvattn.init_cache(1, 8, K, H, window=4), jnp.ones(
        (1, 2, DM)), prefix_lm=True), r"prefix_lm should be False with a ring"),
    (lambda: kvattn.prefill(
        _params(),
        kvattn.init_cache(1, 8, K, H, window=4)._replace(window=None), jnp.ones(
            (1, 2, DM))), r"cache.window should be a positive int in a ring cache"),
])
def test_bad_ring_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
