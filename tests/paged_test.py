"""Tests of the paged cache (kvattn/paged/) against the float64 reference and the dense cache.

The central invariant: whatever the pages, their order, the page size and
the mix of a step (prefill chunks beside decode tokens, padding rows at the
end, in any batch order), each new token's output is full causal attention
over its own sequence, and what the pages hold is its sequence's tokens.
A scheduler here drives many ragged steps, with sequences that finish and
release their pages to new ones, through one compiled step.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np
import pytest

import kvattn
from kvattn import paged
from kvattn import quant
from tests import compiles
from tests import reference

N, H, DM = 4, 8, 16
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 kernel vs float64 reference.

# Jitted once per shape: far faster than dispatching their loops eagerly. The
# checks of concrete metadata are tested on the plain functions.
reserve = jax.jit(paged.reserve)
release = jax.jit(paged.release)
fork = jax.jit(paged.fork)
attention = jax.jit(paged.paged_attention)


def random_qkv(rng, tokens, num_kv_heads):
  q = rng.standard_normal((tokens, N, H), np.float32)
  k = rng.standard_normal((tokens, num_kv_heads, H), np.float32)
  v = rng.standard_normal((tokens, num_kv_heads, H), np.float32)
  return q, k, v


def as_stored(x, dtype):
  """What pages of `dtype` hold for x `[T, K, H]` ("int8": int8 times its scale), as float64."""
  if dtype == "int8":
    return np.asarray(quant.dequantize(*quant.quantize(jnp.asarray(x))), np.float64)
  return np.asarray(jnp.asarray(x).astype(dtype), np.float64)


def causal_reference(q, k, v, num_new, **kw):
  """The last num_new queries of one sequence over all its keys, causal: `[num_new, N, H]`."""
  total = k.shape[0]
  pos = np.arange(total)
  allowed = pos[None, :] <= pos[total - num_new:, None]
  return reference.attention(q[total - num_new:], k, v, allowed, **kw)


def shuffled_reserve(cache, slot, count, rng):
  """`reserve` with random free pages (a fragmented pool), written into the table by hand."""
  table, refs = np.array(cache.page_table), np.array(cache.refs)
  ps = cache.page_size
  have = int(np.sum(table[slot] != paged.NO_PAGE))
  need = -(-(int(cache.lengths[slot]) + count) // ps) - have
  free = np.flatnonzero(refs == 0)
  assert need <= len(free) and have + need <= cache.pages_per_seq
  pages = rng.permutation(free)[:max(need, 0)]
  table[slot, have:have + len(pages)] = pages
  refs[pages] += 1
  return cache._replace(page_table=jnp.asarray(table), refs=jnp.asarray(refs))


@functools.lru_cache(maxsize=None)
def jitted_attention(block_q, block_kv, softcap=None):
  fn = functools.partial(paged.paged_attention, block_q=block_q, block_kv=block_kv, softcap=softcap)
  return jax.jit(fn, donate_argnums=3)


class Scheduler:
  """Runs sequences through paged attention in random ragged steps and checks every output.

  Each step takes a random subset of the unfinished sequences, each with a
  random number of its next tokens (a prefill chunk, a decode token, or all
  that is left), in a random batch order, padded to TT rows and B entries.
  Finished sequences are released and new ones start in their slots.
  """
  def __init__(self, rng, *, num_kv_heads, page_size, num_pages, max_seqs, pages_per_seq, tokens,
               batch, int8=False, dtype=jnp.float32, shuffle_pages=False, block_q=4, block_kv=4,
               softcap=None):
    self.rng = rng
    self.kh, self.tokens, self.batch, self.int8 = num_kv_heads, tokens, batch, int8
    self.shuffle = shuffle_pages
    self.softcap = softcap
    self.cache = paged.init_paged_cache(num_pages, page_size, max_seqs, pages_per_seq, num_kv_heads,
                                        H, dtype, quantized=int8)
    self.step_fn = jitted_attention(block_q, block_kv, softcap)
    self.seqs = {}  # slot -> dict(q, k, v, done)
    self.stored = "int8" if int8 else jnp.dtype(dtype).name

  def start(self, slot, length):
    q, k, v = random_qkv(self.rng, length, self.kh)
    self.seqs[slot] = dict(q=q, k=k, v=v, done=0)

  def step(self, chunks: dict[int, int]):
    """Runs one step: chunks maps slot -> new tokens; returns the output rows."""
    order = self.rng.permutation(list(chunks))
    for slot in order:
      if self.shuffle:
        self.cache = shuffled_reserve(self.cache, int(slot), chunks[slot], self.rng)
    if not self.shuffle:
      counts = np.array([chunks[s] for s in order], np.int32)
      self.cache, fits = reserve(self.cache, np.array(order, np.int32), counts)
      assert np.all(fits)
    q = np.zeros((self.tokens, N, H), np.float32)
    k = np.zeros((self.tokens, self.kh, H), np.float32)
    v = np.zeros((self.tokens, self.kh, H), np.float32)
    q[:], k[:] = np.nan, np.nan  # Padding rows: NaN must reach nothing.
    cu, slots, row = [0], np.zeros(self.batch, np.int32), 0
    spans = {}
    for i, slot in enumerate(order):
      seq, n = self.seqs[slot], chunks[slot]
      lo = seq["done"]
      q[row:row + n], k[row:row + n], v[row:row + n] = (seq[x][lo:lo + n] for x in "qkv")
      spans[slot] = (row, lo, n)
      slots[i] = slot
      row += n
      cu.append(row)
    cu += [row] * (self.batch + 1 - len(cu))
    lengths = np.array(self.cache.lengths)
    o, self.cache = self.step_fn(q, k, v, self.cache, slots, np.array(cu, np.int32), len(order))
    o = np.asarray(o)
    for slot, (first, lo, n) in spans.items():
      seq = self.seqs[slot]
      assert lengths[slot] == lo
      ks, vs = (as_stored(seq[x][:lo + n], self.stored) for x in "kv")
      want = causal_reference(seq["q"][:lo + n], ks, vs, n, softcap=self.softcap)
      np.testing.assert_allclose(o[first:first + n], want, **TOL)
      seq["done"] += n
    np.testing.assert_array_equal(o[row:], 0.0)  # Padding rows.
    assert not np.any(np.asarray(self.cache.exhausted))
    return o

  def check_pages(self):
    """Every live slot's pages hold its tokens, as stored."""
    table = np.asarray(self.cache.page_table)
    k_pages = np.asarray(self.cache.k_pages).astype(np.float64)
    if self.int8:
      k_pages = k_pages * np.asarray(self.cache.k_scale, np.float64)[..., None]
    ps = self.cache.page_size
    for slot, seq in self.seqs.items():
      done = seq["done"]
      assert int(self.cache.lengths[slot]) == done
      pos = np.arange(done)
      held = k_pages[table[slot, pos // ps], pos % ps]
      np.testing.assert_allclose(held, as_stored(seq["k"][:done], self.stored), rtol=1e-6,
                                 atol=1e-6)

  def finish(self, slot):
    mask = np.zeros(self.cache.max_seqs, bool)
    mask[slot] = True
    self.cache = release(self.cache, jnp.asarray(mask))
    del self.seqs[slot]


def run_schedule(rng, sched: Scheduler, num_steps, max_len, max_chunk):
  """Random ragged steps; sequences of random lengths start, finish and free their slots."""
  sq = sched.cache.max_seqs
  for slot in range(sq):
    sched.start(slot, int(rng.integers(1, max_len + 1)))
  for _ in range(num_steps):
    live = [s for s, seq in sched.seqs.items() if seq["done"] < len(seq["q"])]
    rng.shuffle(live)
    chunks, room = {}, sched.tokens
    for slot in live[:sched.batch]:
      left = len(sched.seqs[slot]["q"]) - sched.seqs[slot]["done"]
      n = min(left, room, int(rng.choice([1, 1, max_chunk, rng.integers(1, max_chunk + 1)])))
      if n:
        chunks[slot] = n
        room -= n
    if chunks:
      sched.step(chunks)
    sched.check_pages()
    for slot, seq in list(sched.seqs.items()):
      if seq["done"] == len(seq["q"]) and rng.random() < 0.5:
        sched.finish(slot)
        sched.start(slot, int(rng.integers(1, max_len + 1)))


# --- The cache and page management.


def test_init_paged_cache_layout():
  cache = paged.init_paged_cache(10, 4, 3, 5, 2, H)
  assert cache.k_pages.shape == (10, 4, 2, H) and cache.k_pages.dtype == jnp.float32
  assert cache.page_table.shape == (3, 5) and np.all(np.asarray(cache.page_table) == -1)
  assert cache.lengths.shape == (3,) and cache.refs.shape == (10,)
  assert cache.k_scale is None and not cache.quantized and cache.capacity == 20
  q8 = paged.init_paged_cache(10, 4, 3, 5, 2, H, quantized=True)
  assert q8.k_pages.dtype == jnp.int8 and q8.k_scale.shape == (10, 4, 2)
  assert paged.init_paged_cache(4, 2, 1, 2, 1, H, jnp.bfloat16).v_pages.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pages=0), "num_pages should be a positive int"),
    (dict(head_dim=-1), "head_dim should be a positive int"),
    (dict(dtype=jnp.int32), "dtype should be a floating dtype"),
    (dict(dtype=jnp.bfloat16, quantized=True), "dtype should be float32 when quantized"),
])
def test_init_paged_cache_refuses(kwargs, message):
  args = dict(num_pages=10, page_size=4, max_seqs=3, pages_per_seq=5, num_kv_heads=2, head_dim=H)
  with pytest.raises(ValueError, match=message):
    paged.init_paged_cache(**{**args, **kwargs})


def test_reserve_lowest_pages_first_all_or_none():
  cache = paged.init_paged_cache(6, 2, 4, 3, 1, H)
  cache, fits = reserve(cache, np.array([2, 0, 1], np.int32), np.array([3, 6, 1], np.int32))
  # Slot 2 takes pages 0, 1; slot 0 needs 3 of the 4 left; slot 1 then finds 1.
  np.testing.assert_array_equal(fits, [True, True, True])
  np.testing.assert_array_equal(cache.page_table, [[2, 3, 4], [5, -1, -1], [0, 1, -1], [-1] * 3])
  np.testing.assert_array_equal(cache.refs, [1] * 6)
  # No page left: slot 3 fits nothing, slot 2 fits 1 more token in its page.
  cache, fits = reserve(cache, np.array([3, 2], np.int32), np.array([1, 1], np.int32))
  np.testing.assert_array_equal(fits, [False, True])
  np.testing.assert_array_equal(cache.page_table[3], [-1] * 3)
  assert not np.any(cache.exhausted) and int(paged.pages_in_use(cache)) == 6


def test_reserve_that_does_not_fit_leaves_room_to_later_ones():
  cache = paged.init_paged_cache(4, 1, 3, 4, 1, H)
  cache, fits = reserve(cache, np.array([0, 1, 2], np.int32), np.array([3, 4, 1], np.int32))
  np.testing.assert_array_equal(fits, [True, False, True])
  np.testing.assert_array_equal(cache.page_table, [[0, 1, 2, -1], [-1] * 4, [3, -1, -1, -1]])


def test_reserve_past_capacity_does_not_fit():
  cache = paged.init_paged_cache(8, 2, 2, 2, 1, H)
  cache = cache._replace(lengths=jnp.array([3, 0], jnp.int32))
  cache, fits = reserve(cache, np.array([0, 1], np.int32), np.array([2, 4], np.int32))
  np.testing.assert_array_equal(fits, [False, True])


def test_release_returns_pages_to_the_pool():
  cache = paged.init_paged_cache(4, 2, 2, 2, 1, H)
  cache, _ = reserve(cache, np.array([0, 1], np.int32), np.array([4, 3], np.int32))
  cache = release(cache, jnp.array([True, False]))
  np.testing.assert_array_equal(cache.refs, [0, 0, 1, 1])
  np.testing.assert_array_equal(cache.page_table[0], [-1, -1])
  cache, fits = reserve(cache, np.array([0], np.int32), np.array([1], np.int32))
  assert bool(fits[0]) and int(cache.page_table[0, 0]) == 0


def test_page_management_compiles_once():
  cache = paged.init_paged_cache(16, 2, 4, 4, 1, H)
  reserve, release = jax.jit(paged.reserve), jax.jit(paged.release)
  fork = jax.jit(paged.fork)
  with compiles.compilations() as compiled:
    for counts in ([1, 2, 3, 0], [4, 0, 1, 1], [0, 0, 8, 2]):
      cache, _ = reserve(cache, jnp.array([0, 1, 2, 3], jnp.int32), jnp.array(counts, jnp.int32),
                         jnp.asarray(3, jnp.int32))
      cache = cache._replace(lengths=jnp.minimum(cache.lengths + 1, 8))
      cache, _ = fork(cache, jnp.array([0], jnp.int32), jnp.array([3], jnp.int32))
      cache = release(cache, jnp.array([False, True, False, False]))
  names = [name for name in compiled if name in ("jit(reserve)", "jit(release)", "jit(fork)")]
  assert sorted(names) == ["jit(fork)", "jit(release)", "jit(reserve)"], compiled


# --- Attention over the pages: the float64 reference.


@pytest.mark.parametrize("page_size, num_kv_heads, int8, shuffle", [
    (3, 2, False, True),
    (1, 4, False, False),
    (16, 1, False, True),
    pytest.param(4, 2, True, True, marks=pytest.mark.slow),
    pytest.param(2, 1, True, False, marks=pytest.mark.slow),
    pytest.param(5, 4, False, True, marks=pytest.mark.slow),
])
def test_ragged_steps_match_reference(page_size, num_kv_heads, int8, shuffle):
  """Random mixes of prefill chunks and decode tokens, slots released and reused."""
  rng = np.random.default_rng(page_size * 10 + num_kv_heads)
  pages_per_seq = -(-14 // page_size)
  sched = Scheduler(rng, num_kv_heads=num_kv_heads, page_size=page_size,
                    num_pages=4 * pages_per_seq + 1, max_seqs=4, pages_per_seq=pages_per_seq,
                    tokens=12, batch=3, int8=int8, shuffle_pages=shuffle)
  run_schedule(rng, sched, num_steps=12, max_len=14, max_chunk=9)


def test_ragged_steps_with_default_blocks_bfloat16_and_softcap():
  rng = np.random.default_rng(7)
  sched = Scheduler(rng, num_kv_heads=2, page_size=4, num_pages=20, max_seqs=3, pages_per_seq=5,
                    tokens=10, batch=3, dtype=jnp.bfloat16, block_q=None, block_kv=None,
                    softcap=2.0)
  run_schedule(rng, sched, num_steps=6, max_len=20, max_chunk=10)


@pytest.mark.parametrize("int8", [False, True])
def test_one_call_mixes_prefill_chunks_decode_tokens_and_padding(int8):
  rng = np.random.default_rng(1)
  sched = Scheduler(rng, num_kv_heads=2, page_size=4, num_pages=16, max_seqs=4, pages_per_seq=4,
                    tokens=16, batch=4, block_q=4, block_kv=4, int8=int8)
  for slot, length in enumerate([13, 9, 6, 3]):
    sched.start(slot, length)
  sched.step({0: 5, 1: 9, 2: 1})  # Two prefill chunks and a first token, 1 padding row.
  sched.step({0: 1, 2: 5, 3: 3})  # Decode, chunk, prefill; slot 1 sits this one out.
  sched.step({0: 7})
  sched.check_pages()


def test_padding_rows_and_unused_entries_write_nothing():
  rng = np.random.default_rng(2)
  cache = paged.init_paged_cache(8, 2, 3, 4, 2, H)
  cache, _ = reserve(cache, np.array([0, 1, 2], np.int32), np.array([3, 2, 4], np.int32))
  q, k, v = random_qkv(rng, 8, 2)
  # Two sequences; entry 2 (slot 2) is past num_seqs; rows 5.. are padding.
  o, new = attention(q, k, v, cache, np.array([1, 0, 2], np.int32), np.array([0, 2, 5, 8],
                                                                             np.int32), 2)
  np.testing.assert_array_equal(new.lengths, [3, 2, 0])
  np.testing.assert_array_equal(o[5:], 0.0)
  pages = np.asarray(new.k_pages)
  unused = [p for p in range(8) if p not in (0, 1, 2)]  # Slot 2's pages, and the free ones.
  np.testing.assert_array_equal(pages[unused], 0.0)


# --- The layer: the dense cache and the reference.


def make_params(num_kv_heads, seed=0, **kw):
  params = kvattn.init_params(jax.random.key(seed), DM, N, num_kv_heads=num_kv_heads, head_dim=H,
                              use_bias=True, **kw)
  keys = jax.random.split(jax.random.key(seed + 1), 4)
  for key, name in zip(keys, ("bq", "bk", "bv", "bo")):
    params[name] = 0.5 * jax.random.normal(key, params[name].shape)
  for name in ("q_norm", "k_norm"):  # Scales other than 1, so that a skipped norm shows.
    if name in params:
      params[name] = 1.0 + 0.5 * jax.random.normal(jax.random.key(ord(name[0])), params[name].shape)
  return params


@pytest.mark.parametrize("num_kv_heads, page_size, layer_kw, qk_norm", [
    (2, 3, dict(rope_base=10_000.0), None),
    (1, 1, dict(rope_base=100.0, rotary_dim=4, scale=0.3, softcap=5.0), None),
    (4, 8, dict(), "head"),
])
def test_paged_prefill_equals_dense_cache_and_reference(num_kv_heads, page_size, layer_kw, qk_norm):
  """Two sequences: prefill chunks and decode steps, dense (a padded batch) and paged (ragged)."""
  params = make_params(num_kv_heads, qk_norm=qk_norm)
  rng = np.random.default_rng(3)
  lengths, prompt = [9, 4], [6, 3]
  x = rng.standard_normal((2, max(lengths), DM)).astype(np.float32)
  mask = np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]
  want = reference.layer(params, x, mask, np.arange(max(lengths)), **layer_kw)
  # Dense: the prompts as one right-padded prefill, then decode steps.
  dense = kvattn.init_cache(2, 16, num_kv_heads, H)
  dense_prefill = jax.jit(kvattn.prefill, static_argnames=tuple(layer_kw))
  out_dense, dense = dense_prefill(params, dense, x[:, :6],
                                   mask[:, :6] & (np.arange(6) < np.array(prompt)[:, None]),
                                   **layer_kw)
  # Paged: the same prompts as one ragged call (sequence 1 first), then ragged decode calls.
  cache = paged.init_paged_cache(16, page_size, 3, -(-12 // page_size), num_kv_heads, H)
  step = jax.jit(paged.paged_prefill, static_argnames=tuple(layer_kw))
  slots = np.array([2, 0], np.int32)  # Sequence 0 in slot 2, sequence 1 in slot 0.
  cache, _ = reserve(cache, slots, np.array(prompt, np.int32))
  flat = np.concatenate([x[0, :6], x[1, :3], np.zeros((1, DM), np.float32)])
  out, cache = step(params, cache, flat, slots, np.array([0, 6, 9], np.int32), 2, **layer_kw)
  np.testing.assert_allclose(out[:6], want[0, :6], **TOL)
  np.testing.assert_allclose(out[6:9], want[1, :3], **TOL)
  np.testing.assert_allclose(out[:6], out_dense[0, :6], **TOL)
  np.testing.assert_allclose(out[6:9], out_dense[1, :3], **TOL)
  np.testing.assert_array_equal(out[9:], 0.0)
  # One decode token each, sequence 1 first: the dense cache's decode step.
  dense_decode = jax.jit(kvattn.decode_step, static_argnames=tuple(layer_kw))
  out_dense, dense = dense_decode(params, dense, np.stack([x[0, 6:7], x[1, 3:4]]), **layer_kw)
  cache, _ = reserve(cache, slots[::-1], np.array([1, 1], np.int32))
  flat = np.zeros((10, DM), np.float32)
  flat[:2] = x[1, 3], x[0, 6]
  out, cache = step(params, cache, flat, slots[::-1], np.array([0, 1, 2], np.int32), 2, **layer_kw)
  np.testing.assert_allclose(out[0], want[1, 3], **TOL)
  np.testing.assert_allclose(out[1], want[0, 6], **TOL)
  np.testing.assert_allclose(out[:2], out_dense[::-1, 0], **TOL)
  # Sequence 0 alone to its end (num_seqs 1): the same compiled step.
  for t in range(7, 9):
    cache, _ = reserve(cache, slots, np.array([1, 0], np.int32))
    flat = np.zeros((10, DM), np.float32)
    flat[0] = x[0, t]
    out, cache = step(params, cache, flat, slots, np.array([0, 1, 1], np.int32), 1, **layer_kw)
    np.testing.assert_allclose(out[0], want[0, t], **TOL)
    np.testing.assert_array_equal(out[1:], 0.0)
  np.testing.assert_array_equal(cache.lengths, [4, 0, 9])
  assert not np.any(cache.exhausted)


def test_token_positions_count_each_sequence():
  cache = paged.init_paged_cache(8, 2, 3, 4, 1, H)._replace(lengths=jnp.array([5, 0, 2], jnp.int32))
  positions = paged.token_positions(cache, 7, np.array([2, 0], np.int32),
                                    np.array([0, 3, 4], np.int32), 2)
  np.testing.assert_array_equal(positions, [2, 3, 4, 5, 0, 0, 0])


def test_paged_prefill_refuses_longrope():
  params = make_params(2)
  cache = paged.init_paged_cache(8, 2, 2, 4, 2, H)
  scaling = kvattn.rope.Scaling("longrope", 2.0, original_max_positions=4,
                                short_factor=(1.0,) * (H // 2), long_factor=(2.0,) * (H // 2))
  with pytest.raises(ValueError, match="longrope"):
    paged.paged_prefill(params, cache, np.zeros((2, DM), np.float32), np.array([0], np.int32),
                        np.array([0, 2], np.int32), 1, rope_base=10.0, rope_scaling=scaling)


# --- Release, reuse, fork.


def test_released_pages_serve_another_sequence():
  rng = np.random.default_rng(4)
  sched = Scheduler(rng, num_kv_heads=2, page_size=2, num_pages=4, max_seqs=2, pages_per_seq=4,
                    tokens=8, batch=2)
  sched.start(0, 7)
  sched.step({0: 7})
  pages = set(np.asarray(sched.cache.page_table[0, :4]).tolist())
  sched.finish(0)
  assert int(paged.pages_in_use(sched.cache)) == 0
  sched.start(1, 8)
  sched.step({1: 5})
  sched.step({1: 3})
  assert set(np.asarray(sched.cache.page_table[1]).tolist()) == pages  # The same 4 pages.
  sched.check_pages()


@pytest.mark.parametrize("length", [6, 8])  # A partial last page, and only full pages.
def test_forked_sequences_diverge(length):
  rng = np.random.default_rng(length)
  sched = Scheduler(rng, num_kv_heads=2, page_size=4, num_pages=8, max_seqs=3, pages_per_seq=4,
                    tokens=4, batch=2)
  sched.start(0, length + 3)
  sched.step({0: 4})
  sched.step({0: length - 4})
  before = np.asarray(sched.cache.k_pages).copy()
  src_pages = np.asarray(sched.cache.page_table[0]).copy()
  sched.cache, ok = fork(sched.cache, 0, 2)
  assert bool(ok)
  table = np.asarray(sched.cache.page_table)
  np.testing.assert_array_equal(table[2, :length // 4], src_pages[:length // 4])
  assert int(sched.cache.lengths[2]) == length
  refs = np.asarray(sched.cache.refs)
  assert np.all(refs[src_pages[:length // 4]] == 2)
  if length % 4:
    assert table[2, length // 4] not in src_pages and refs[table[2, length // 4]] == 1
  # The fork continues with tokens of its own: same prefix, different suffix.
  seq = sched.seqs[0]
  q, k, v = random_qkv(rng, 3, 2)
  sched.seqs[2] = dict(q=np.concatenate([seq["q"][:length],
                                         q]), k=np.concatenate([seq["k"][:length], k]),
                       v=np.concatenate([seq["v"][:length], v]), done=length)
  sched.step({0: 1, 2: 1})
  sched.step({0: 2, 2: 2})
  sched.check_pages()
  # The source's own pages kept every token they held before the fork.
  after = np.asarray(sched.cache.k_pages)
  for j in range(length // 4):
    np.testing.assert_array_equal(after[src_pages[j]], before[src_pages[j]])
  sched.finish(0)  # The fork keeps the shared pages.
  sched.check_pages()
  assert np.all(np.asarray(sched.cache.refs)[src_pages[:length // 4]] == 1)


def test_fork_without_a_free_page_fails_and_leaves_the_source():
  cache = paged.init_paged_cache(2, 4, 2, 2, 1, H)
  cache, _ = reserve(cache, np.array([0], np.int32), np.array([6], np.int32))
  cache = cache._replace(lengths=jnp.array([6, 0], jnp.int32))
  new, ok = fork(cache, np.array([0], np.int32), np.array([1], np.int32))
  assert not bool(ok[0])
  np.testing.assert_array_equal(new.page_table, cache.page_table)
  np.testing.assert_array_equal(new.refs, cache.refs)


def test_fork_shares_written_pages_only():
  cache = paged.init_paged_cache(6, 4, 3, 4, 1, H)
  cache, _ = reserve(cache, np.array([0], np.int32), np.array([12], np.int32))  # Pages 0, 1, 2.
  cache = cache._replace(lengths=jnp.array([5, 0, 0], jnp.int32),
                         k_pages=jnp.arange(6 * 4 * H, dtype=jnp.float32).reshape(6, 4, 1, H))
  new, ok = fork(cache, np.array([0, 0], np.int32), np.array([2, 1], np.int32))
  np.testing.assert_array_equal(ok, [True, True])
  # Page 0 shared by all three; page 1 (partial) copied into pages 3 and 4; page 2 not shared.
  np.testing.assert_array_equal(new.page_table, [[0, 1, 2, -1], [0, 4, -1, -1], [0, 3, -1, -1]])
  np.testing.assert_array_equal(new.refs, [3, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(new.k_pages[3], cache.k_pages[1])
  np.testing.assert_array_equal(new.k_pages[4], cache.k_pages[1])
  np.testing.assert_array_equal(new.lengths, [5, 5, 5])


# --- Compile once; exhaustion; bad metadata.


def test_one_compilation_for_any_mix():
  rng = np.random.default_rng(5)
  with compiles.compilations("paged_attention") as compiled:
    sched = Scheduler(rng, num_kv_heads=2, page_size=2, num_pages=24, max_seqs=4, pages_per_seq=6,
                      tokens=8, batch=3, block_q=3, block_kv=2)
    sched.step_fn = jax.jit(functools.partial(paged.paged_attention, block_q=3, block_kv=2),
                            donate_argnums=3)
    run_schedule(rng, sched, num_steps=6, max_len=12, max_chunk=8)
  assert compiled == ["paged_attention"]


def exhaust_setup():
  """Pages of 2 tokens, 4 in the pool: slot 0 holds 3 tokens (pages 0, 1), slot 1 2 (page 2)."""
  rng = np.random.default_rng(6)
  cache = paged.init_paged_cache(4, 2, 3, 3, 2, H)
  q, k, v = random_qkv(rng, 8, 2)
  cache, _ = reserve(cache, np.array([0, 1], np.int32), np.array([3, 2], np.int32))
  _, cache = attention(q[:5], k[:5], v[:5], cache, np.array([0, 1], np.int32),
                       np.array([0, 3, 5], np.int32), 2)
  return cache, (q, k, v)


def test_exhaustion_is_per_sequence_and_keeps_what_was_written():
  cache, (q, k, v) = exhaust_setup()
  pages = np.asarray(cache.k_pages).copy()
  # Slot 1 takes 3 more tokens with no page reserved; slot 0 one token in its own page.
  o, new = attention(q[4:8], k[4:8], v[4:8], cache, np.array([1, 0], np.int32),
                     np.array([0, 3, 4], np.int32), 2)
  np.testing.assert_array_equal(new.exhausted, [False, True, False])
  np.testing.assert_array_equal(new.lengths, [4, 2, 0])
  table = np.asarray(cache.page_table)
  np.testing.assert_array_equal(np.asarray(new.k_pages)[table[1, 0]], pages[table[1, 0]])
  # Its output is still attention over its 2 cached tokens and its 3 new ones.
  ks = np.concatenate([k[3:5], k[4:7]])
  vs = np.concatenate([v[3:5], v[4:7]])
  qs = np.concatenate([q[3:5], q[4:7]])
  np.testing.assert_allclose(o[:3], causal_reference(qs, ks, vs, 3), **TOL)
  want0 = causal_reference(np.concatenate([q[:3], q[7:8]]), np.concatenate([k[:3], k[7:8]]),
                           np.concatenate([v[:3], v[7:8]]), 1)
  np.testing.assert_allclose(o[3:4], want0, **TOL)
  # Sticky: reserve refuses it, and a later write is refused too, until release.
  new, fits = reserve(new, np.array([1], np.int32), np.array([1], np.int32))
  assert not bool(fits[0])
  new = release(new, jnp.array([False, True, False]))
  assert not bool(new.exhausted[1]) and int(new.lengths[1]) == 0


def test_a_write_past_capacity_is_refused():
  cache = paged.init_paged_cache(8, 2, 2, 2, 1, H)
  cache = cache._replace(lengths=jnp.array([3, 0], jnp.int32))
  cache, _ = reserve(cache, np.array([0], np.int32), np.array([1], np.int32))
  q, k, v = random_qkv(np.random.default_rng(0), 2, 1)
  _, new = attention(q, k, v, cache, np.array([0], np.int32), np.array([0, 2], np.int32), 1)
  assert bool(new.exhausted[0]) and int(new.lengths[0]) == 3


def bad_call_args():
  cache = paged.init_paged_cache(8, 2, 3, 3, 2, H)
  q, k, v = random_qkv(np.random.default_rng(0), 6, 2)
  return dict(q=q, k=k, v=v, cache=cache, seq_slots=np.array([0, 1], np.int32),
              cu_q_lens=np.array([0, 2, 5], np.int32), num_seqs=2)


@pytest.mark.parametrize("change, message", [
    (dict(cu_q_lens=np.array([1, 2, 5], np.int32)), "cu_q_lens should start at 0"),
    (dict(cu_q_lens=np.array([0, 4, 3], np.int32)), "not decrease"),
    (dict(cu_q_lens=np.array([0, 4, 7], np.int32)), "up to at most TT=6"),
    (dict(cu_q_lens=np.array([0, 2], np.int32)), r"cu_q_lens shape should be \(B \+ 1,\)"),
    (dict(num_seqs=3), r"num_seqs should be in \[0, B=2\]"),
    (dict(seq_slots=np.array([0, 3], np.int32)), r"seq_slots should be slots in \[0, SQ=3\)"),
    (dict(seq_slots=np.array([1, 1], np.int32)), "seq_slots should be distinct"),
    (dict(seq_slots=np.array([0.0, 1.0], np.float32)), "seq_slots dtype should be an integer"),
    (dict(k=np.zeros((6, 1, H), np.float32)), r"k shape should be \(TT, K, H\)=\(6, 2, 8\)"),
    (dict(q=np.zeros((6, 3, H), np.float32)), "multiple of the kv heads"),
])
def test_bad_metadata_is_refused(change, message):
  args = bad_call_args()
  args.update(change)
  with pytest.raises(ValueError, match=message):
    paged.paged_attention(**args)


def test_bad_metadata_past_capacity_and_bad_page_ids_are_refused():
  args = bad_call_args()
  q, k, v = random_qkv(np.random.default_rng(0), 8, 2)
  with pytest.raises(ValueError, match=r"more than a slot holds, PPS \* PS=6"):
    paged.paged_attention(q, k, v, args["cache"], args["seq_slots"], np.array([0, 1, 8], np.int32),
                          2)
  cache = args["cache"]._replace(page_table=args["cache"].page_table.at[1, 0].set(8))
  with pytest.raises(ValueError, match=r"page ids in \[0, NP=8\).*but got 8 at \[1, 0\]"):
    paged.paged_attention(**{**args, "cache": cache})
  with pytest.raises(ValueError, match=r"counts should be in \[0, PPS \* PS=6\]"):
    paged.reserve(cache, np.array([0], np.int32), np.array([7], np.int32))
  with pytest.raises(ValueError, match="dst should hold no src slot"):
    paged.fork(cache, np.array([0, 1], np.int32), np.array([1, 2], np.int32))
  with pytest.raises(TypeError, match="PagedCache"):
    paged.paged_attention(**{**args, "cache": kvattn.init_cache(1, 8, 2, H)})


@pytest.mark.parametrize(
    "slots, cu, num",
    [
        ([1, 7], [0, 3, 6], 2),  # A slot out of range.
        ([-1, 1], [0, 3, 6], 2),  # A negative slot (would index from the end).
        ([1, 1], [0, 3, 6], 2),  # Slot 1 named twice.
        ([1, 0], [0, 6, 3], 2),  # cu_q_lens decreasing.
        ([1, 2], [-4, 20, 40], 5),  # cu_q_lens out of range, num_seqs past B.
        ([1, 2], [0, 6, 6], 1),  # More tokens than slot 1 reserved.
        ([1, 5], [0, 1, 6], 2),  # Slot 1 writes its one reserved token; slot 5 is out of range.
    ])
def test_traced_metadata_cannot_write_into_another_sequences_pages(slots, cu, num):
  cache, _ = exhaust_setup()  # Slot 0 holds 3 tokens, slot 1 holds 2.
  cache, _ = reserve(cache, np.array([1], np.int32), np.array([1], np.int32))
  q, k, v = random_qkv(np.random.default_rng(9), 6, 2)
  o, new = attention(q, k, v, cache, jnp.array(slots, jnp.int32), jnp.array(cu, jnp.int32),
                     jnp.asarray(num, jnp.int32))
  assert np.all(np.isfinite(np.asarray(o)))
  victim = np.asarray(cache.page_table)[0]
  victim = victim[victim >= 0]
  for name in ("k_pages", "v_pages"):
    np.testing.assert_array_equal(
        np.asarray(getattr(new, name))[victim],
        np.asarray(getattr(cache, name))[victim])
  assert int(new.lengths[0]) == 3 and not bool(new.exhausted[0])
  np.testing.assert_array_equal(new.page_table[0], cache.page_table[0])
  np.testing.assert_array_equal(new.refs, cache.refs)


# --- Sharding and memory.


def test_pages_sharded_over_kv_heads_equal_unsharded():
  mesh = kvattn.sharding.make_mesh("data:4,model:2")
  rng = np.random.default_rng(8)
  cache = paged.init_paged_cache(16, 2, 3, 6, 2, H)
  specs = paged.paged_cache_specs(cache, mesh)
  assert specs.k_pages == PartitionSpec(None, None, "model", None)
  assert specs.page_table == PartitionSpec(None, None) and specs.refs == PartitionSpec(None)
  shardings = paged.paged_cache_shardings(cache, mesh)
  slots = np.array([2, 0], np.int32)
  step = functools.partial(paged.paged_attention, block_q=2, block_kv=2)
  sharded_step = jax.jit(step, out_shardings=(None, shardings))
  results = []
  for run, c in ((jax.jit(step), cache), (sharded_step, jax.device_put(cache, shardings))):
    rng = np.random.default_rng(8)
    outs = []
    for counts in ([5, 3], [1, 1], [2, 1]):
      c, _ = reserve(c, slots, np.array(counts, np.int32))
      q, k, v = random_qkv(rng, 8, 2)
      o, c = run(q, k, v, c, slots, np.array([0, counts[0], sum(counts)], np.int32), 2)
      outs.append(np.asarray(o))
    if run is sharded_step:
      assert c.k_pages.sharding.spec == PartitionSpec(None, None, "model", None)
      assert c.page_table.sharding.is_fully_replicated
    results.append((outs, c))
  (want, plain), (got, sharded) = results
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sharded.k_pages, plain.k_pages, rtol=1e-6)
  np.testing.assert_array_equal(sharded.page_table, plain.page_table)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_step_memory_does_not_grow_with_the_pool(dtype):
  """Temporaries of a compiled step: the same for a pool of 256 pages and of 4096."""
  def temp(num_pages):
    cache = paged.init_paged_cache(num_pages, 16, 8, 32, 2, 32,
                                   jnp.float32 if dtype == "int8" else dtype,
                                   quantized=dtype == "int8")
    q = jnp.zeros((24, 4, 32))
    kv = jnp.zeros((24, 2, 32))
    step = jax.jit(paged.paged_attention, donate_argnums=3)
    stats = step.lower(q, kv, kv, cache, jnp.arange(8, dtype=jnp.int32), jnp.zeros(9, jnp.int32),
                       jnp.asarray(8, jnp.int32)).compile().memory_analysis()
    pool = sum(x.nbytes for x in (cache.k_pages, cache.v_pages))
    return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes, pool

  small, _ = temp(256)
  large, pool = temp(4096)
  assert large < small + 64 * 1024, (small, large)
  assert large < pool / 8, (large, pool)
