"""Tests of kvattn.generation on a tiny random transformer and on a toy model.

Greedy tokens must not depend on the other rows of a ragged batch, nor on the
cache at all (recomputing the full forward each step gives the same tokens).
The loop's bookkeeping (which logits start each row under every prefill
mode, EOS, early stop, what finished rows feed) is checked exactly on a
toy model that counts. Padding the prompts to a bucket length changes the
compilations and the caches' layout, never the tokens. (tests/generate_example_test.py
checks that the three prefill modes give the same greedy tokens with the
bundled model.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn.models import transformer
import kvattn
from kvattn import generation
from kvattn import sampling
from tests import compiles

CONFIG = transformer.Config(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=8, d_ff=64, rope_base=10_000.0)
LEARNED = CONFIG._replace(max_positions=32, rope_base=None, tie_embeddings=False)
GREEDY = sampling.Sampler()
SAMPLER = sampling.Sampler(temperature=1.0, top_k=10, top_p=0.9)
# Every test uses these shapes, or few others: each new shape compiles again.
B, P, N = 3, 6, 8  # batch, padded prompt length, max_new_tokens


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
  # Embeddings 10x init's, so logits (std ~1) are far from ties yet not degenerate.
  params = transformer.init_params(jax.random.key(seed), config)
  return {**params, "embed": params["embed"] * 10}


def _prompts(lengths, width, left_pad, seed=0):
  """Random tokens [B, width] and mask [B, width] with lengths[b] real tokens per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CONFIG.vocab_size, (len(lengths), width)).astype(np.int32)
  pos = np.arange(width)[None]
  n = np.asarray(lengths)[:, None]
  mask = pos >= width - n if left_pad else pos < n
  return tokens, mask


def _generate(config, params, tokens, mask, *, sampler=GREEDY, max_new_tokens=N, seed=0,
              max_len=P + N, **kw):
  caches = transformer.init_caches(config, tokens.shape[0], max_len)
  return generation.generate(transformer.step_fn(config), params, caches, tokens, mask,
                             max_new_tokens=max_new_tokens, sampler=sampler,
                             key=jax.random.key(seed), **kw)


@pytest.mark.parametrize("config, left_pad", [(CONFIG, False), (CONFIG, True), (LEARNED, False)],
                         ids=["rope_right_pad", "rope_left_pad", "learned_positions"])
@pytest.mark.slow
def test_cached_greedy_equals_recomputing_the_full_forward(config, left_pad):
  params = _params(config)
  lengths = [6, 2, 5]
  tokens, mask = _prompts(lengths, P, left_pad)
  cached = _generate(config, params, tokens, mask)
  assert len(np.unique(cached.tokens)) > 3  # Not a degenerate model.
  # The oracle: no cache, the whole sequence through `forward` for every new token.
  width = P + N
  forward = jax.jit(transformer.forward, static_argnames="config")
  for b, n in enumerate(lengths):
    seq = list(tokens[b][mask[b]])
    for _ in range(N):
      padded = np.zeros((1, width), np.int32)
      padded[0, :len(seq)] = seq
      real = jnp.asarray(np.arange(width) < len(seq))[None]
      logits = forward(params, jnp.asarray(padded), real, config=config)
      seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    np.testing.assert_array_equal(cached.tokens[b], seq[n:], err_msg=f"row {b}")


def test_each_row_of_a_ragged_batch_equals_the_prompt_alone():
  params = _params(CONFIG, seed=1)
  lengths = [5, 1, 6]
  tokens, mask = _prompts(lengths, P, left_pad=False, seed=1)
  batch = _generate(CONFIG, params, tokens, mask)
  for b in (1, 2):  # Rows 0 and 1 both end before column P - 1; one suffices.
    n = lengths[b]
    alone_tokens = tokens[b:b + 1, :n]
    alone = _generate(CONFIG, params, alone_tokens, np.ones_like(alone_tokens, bool))
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[b], err_msg=f"row {b}")


def _counting_model(params, caches, tokens, mask):
  """A toy step_fn: the next token is always (token + 1) % V.

  Its "caches" count the calls and the real tokens fed per row.
  """
  del params
  calls, fed = caches
  v = 10
  mask = jnp.ones(tokens.shape, bool) if mask is None else mask
  logits = jax.nn.one_hot((tokens + 1) % v, v) * 10.0
  return logits, (calls + 1, fed + jnp.sum(mask, axis=1, dtype=jnp.int32))


@pytest.mark.parametrize("prefill_mode, chunk_size", [("one_pass", None), ("chunked", 2),
                                                      ("forced", None)])
def test_eos_stops_each_row_and_the_loop_once_all_rows_are_done(prefill_mode, chunk_size):
  # These caches hold no KVCache, so their room is unknown and the prompts are not
  # padded to a bucket: the prefill calls below are those of P = 3.
  tokens = np.array([[1, 2, 0], [0, 0, 5], [5, 6, 7]], np.int32)  # Padded right, left, not.
  mask = np.array([[1, 1, 0], [0, 0, 1], [1, 1, 1]], bool)
  caches = (jnp.zeros((), jnp.int32), jnp.zeros((3,), jnp.int32))
  out = generation.generate(_counting_model, None, caches, tokens, mask, max_new_tokens=8,
                            sampler=GREEDY, key=jax.random.key(0), eos_id=8, pad_id=-1,
                            prefill_mode=prefill_mode, chunk_size=chunk_size)
  np.testing.assert_array_equal(
      out.tokens,
      [[3, 4, 5, 6, 7, 8, -1, -1], [6, 7, 8, -1, -1, -1, -1, -1], [8, -1, -1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(out.lengths, [6, 3, 1])
  calls, fed = out.caches
  prefill_calls = {"one_pass": 1, "chunked": 2, "forced": 3}[prefill_mode]
  assert int(calls) == prefill_calls + 5  # Stopped once row 0 was done, not after 8.
  np.testing.assert_array_equal(fed, [2 + 5, 1 + 2, 3 + 0])  # Finished rows feed nothing.


def test_several_eos_ids_each_end_a_row():
  """Llama 3 lists several EOS ids; a row stops at whichever comes first."""
  tokens = np.array([[1], [4], [7]], np.int32)
  caches = (jnp.zeros((), jnp.int32), jnp.zeros((3,), jnp.int32))
  out = generation.generate(_counting_model, None, caches, tokens, np.ones(
      (3, 1), bool), max_new_tokens=6, sampler=GREEDY, key=jax.random.key(0), eos_id=[4, 9],
                            pad_id=-1)
  np.testing.assert_array_equal(
      out.tokens, [[2, 3, 4, -1, -1, -1], [5, 6, 7, 8, 9, -1], [8, 9, -1, -1, -1, -1]])
  np.testing.assert_array_equal(out.lengths, [3, 5, 2])


def test_without_eos_every_row_runs_to_max_new_tokens():
  tokens = np.array([[1, 2], [5, 0]], np.int32)
  mask = np.array([[1, 1], [1, 0]], bool)
  caches = (jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.int32))
  out = generation.generate(_counting_model, None, caches, tokens, mask, max_new_tokens=4,
                            sampler=GREEDY, key=jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, [[3, 4, 5, 6], [6, 7, 8, 9]])
  np.testing.assert_array_equal(out.lengths, [4, 4])
  assert int(out.caches[0]) == 1 + 3


@pytest.mark.slow
def test_eos_on_the_transformer_and_in_the_stream():
  params = _params(CONFIG, seed=2)
  tokens, mask = _prompts([6, 4, 3], P, left_pad=True, seed=2)
  # Sampling: column i is drawn with fold_in(key, i) whatever the other rows do, so a row
  # runs as without EOS until its EOS. (eos_id=-1, never drawn, shares the compilation.)
  free = np.asarray(_generate(CONFIG, params, tokens, mask, sampler=SAMPLER, eos_id=-1).tokens)
  eos = int(free[0, 2])  # Row 0 meets it at column 2 at the latest.
  out = _generate(CONFIG, params, tokens, mask, sampler=SAMPLER, eos_id=eos)
  for b in range(B):
    hits = np.nonzero(free[b] == eos)[0]
    stop = hits[0] + 1 if hits.size else N
    np.testing.assert_array_equal(out.tokens[b, :stop], free[b, :stop])
    np.testing.assert_array_equal(out.tokens[b, stop:], 0)
    assert int(out.lengths[b]) == stop
  # One cache slot per decode step, and the loop ran until the last row stopped.
  np.testing.assert_array_equal(out.caches[0].index,
                                [P + int(np.max(out.lengths)) - 1] * CONFIG.num_layers)

  # The stream stops at the same point and yields the same columns.
  caches = transformer.init_caches(CONFIG, B, P + N)
  columns = list(
      generation.generate_stream(transformer.step_fn(CONFIG), params, caches, tokens, mask,
                                 max_new_tokens=N, sampler=SAMPLER, key=jax.random.key(0),
                                 eos_id=eos))
  assert len(columns) == int(np.max(out.lengths))
  np.testing.assert_array_equal(np.stack(columns, 1), out.tokens[:, :len(columns)])


@pytest.mark.slow
def test_stream_yields_the_compiled_loops_tokens():
  params = _params(CONFIG, seed=3)
  tokens, mask = _prompts([5, 2, 6], P, left_pad=False, seed=3)
  compiled = _generate(CONFIG, params, tokens, mask, sampler=SAMPLER, seed=4, eos_id=-1)
  caches = transformer.init_caches(CONFIG, B, P + N)
  stream = generation.generate_stream(transformer.step_fn(CONFIG), params, caches, tokens, mask,
                                      max_new_tokens=N, sampler=SAMPLER, key=jax.random.key(4),
                                      eos_id=-1)
  columns = [np.asarray(c) for c in stream]
  np.testing.assert_array_equal(np.stack(columns, axis=1), compiled.tokens)


def test_seeds_are_reproducible_and_compile_once():
  params = _params(CONFIG, seed=5)
  tokens, mask = _prompts([3, 6, 1], P, left_pad=False, seed=5)
  before = generation.finish._cache_size()
  kw = dict(sampler=SAMPLER, eos_id=-1)  # The same compilation as the tests above.
  a = _generate(CONFIG, params, tokens, mask, seed=1, **kw).tokens
  b = _generate(CONFIG, params, tokens, mask, seed=1, **kw).tokens
  c = _generate(CONFIG, params, tokens, mask, seed=2, **kw).tokens
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  assert generation.finish._cache_size() - before <= 1


def _bad(**kw):
  """A call of generate with kw changed; built lazily, so importing this file
  does not start the jax backend (under Bazel it is imported before conftest)."""
  def call():
    tokens, mask = _prompts([3, 2], 3, left_pad=False)
    args = dict(tokens=tokens, mask=mask, max_new_tokens=4) | kw
    return generation.generate(args.pop("step", transformer.step_fn(CONFIG)), _params(CONFIG),
                               transformer.init_caches(CONFIG, 2, 10), args.pop("tokens"),
                               args.pop("mask"), sampler=GREEDY, key=jax.random.key(0), **args)

  return call


@pytest.mark.slow
def test_ten_thousand_tokens_one_compilation_flat_memory_overflow_at_capacity():
  """A long run through generate: compiled once, no live buffer left behind, no NaN,
  and the cache overflows exactly when a write passes its capacity."""
  config = transformer.Config(vocab_size=16, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1,
                              head_dim=8, d_ff=16, rope_base=10_000.0)
  params = transformer.init_params(jax.random.key(0), config)
  tokens, mask = np.array([[1, 2, 3]], np.int32), np.ones((1, 3), bool)
  new_tokens = 10_000
  sampler = sampling.Sampler(temperature=1.0)
  step_fn = transformer.step_fn(config)

  compiled = (generation.start._cache_size(), generation.finish._cache_size())
  live = {id(a) for a in jax.live_arrays()}
  # Room for exactly the prompt and the tokens fed back: P + new_tokens - 1.
  caches = transformer.init_caches(config, 1, 3 + new_tokens - 1)
  out = generation.generate(step_fn, params, caches, tokens, mask, max_new_tokens=new_tokens,
                            sampler=sampler, key=jax.random.key(1))
  # One compiled prefill and one compiled loop for all 10,000 steps.
  assert (generation.start._cache_size(), generation.finish._cache_size()) == (compiled[0] + 1,
                                                                               compiled[1] + 1)
  assert int(out.lengths[0]) == new_tokens and np.all((out.tokens >= 0) & (out.tokens < 16))
  assert not bool(kvattn.overflowed(out.caches).any())
  np.testing.assert_array_equal(out.caches[0].index, [3 + new_tokens - 1])
  # Exactly full: one more token does not fit, and is reported.
  step = jax.jit(step_fn)
  logits, full = step(params, out.caches, out.tokens[:, -1:], None)
  assert bool(kvattn.overflowed(full).all()) and np.all(np.isfinite(logits))
  del out, full, logits, caches
  left = [a for a in jax.live_arrays() if id(a) not in live]
  assert not left, [a.shape for a in left]


@pytest.mark.parametrize("call, match", [
    (_bad(max_new_tokens=9), r"max_len S=10, too small for P \+ max_new_tokens - 1 = 3 \+ 9"),
    (_bad(max_new_tokens=0), r"max_new_tokens should be a positive int: but got 0"),
    (_bad(eos_id=[]), r"eos_id should be None, an int or a non-empty list of ints: but got \[\]"),
    (_bad(eos_id=2.5), r"eos_id should be None, an int or a non-empty list of ints"),
    (_bad(max_new_tokens=True), r"max_new_tokens should be a positive int: but got True"),
    (_bad(prefill_mode="lazy"), r"prefill_mode should be one of"),
    (_bad(prefill_mode="chunked"), r"chunk_size should be a positive int"),
    (_bad(mask=np.ones((2, 4), bool)), r"mask shape should be \(B, T\)=\(2, 3\)"),
    (_bad(tokens=np.ones((2, 3), np.float32)), r"prompt_tokens dtype should be an integer"),
    (_bad(tokens=np.ones((3,), np.int32)), r"prompt_tokens shape should be \(B, P\)"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# Prompts of these lengths fall in the default buckets 16 and 32.
BUCKET_LENGTHS = (3, 9, 17, 20)
BUCKET_N = 4  # max_new_tokens
BUCKET_MAX_LEN = 32 + BUCKET_N - 1  # Room for the bucket 32.


def _bucket_prompt(n):
  """Prompts [2, n]: rows of n and n - 2 real tokens, padded left if n is odd, else right."""
  return _prompts([n, max(n - 2, 1)], n, left_pad=n % 2 == 1, seed=n)


@pytest.mark.parametrize("prefill_mode, chunk_size", [("one_pass", None), ("chunked", 5)])
@pytest.mark.slow
def test_a_stream_of_prompt_lengths_compiles_once_per_bucket_with_the_same_tokens(
    prefill_mode, chunk_size):
  params = _params(CONFIG, seed=6)
  kw = dict(prefill_mode=prefill_mode, chunk_size=chunk_size, max_new_tokens=BUCKET_N,
            max_len=BUCKET_MAX_LEN)
  with compiles.compilations("start") as compiled:
    bucketed = [_generate(CONFIG, params, *_bucket_prompt(n), **kw) for n in BUCKET_LENGTHS]
  assert len(compiled) == 2  # Buckets 16 and 32.
  for n, out in zip(BUCKET_LENGTHS, bucketed):
    tokens, mask = _bucket_prompt(n)
    plain = _generate(CONFIG, params, tokens, mask, prompt_buckets=None, **kw)
    np.testing.assert_array_equal(out.tokens, plain.tokens, err_msg=f"P={n}")
    # The padding takes cache slots, not positions: the same real tokens, further on.
    bucket = 16 if n <= 16 else 32
    np.testing.assert_array_equal(out.caches[0].index, [bucket + BUCKET_N - 1] * CONFIG.num_layers)
    np.testing.assert_array_equal(plain.caches[0].index, [n + BUCKET_N - 1] * CONFIG.num_layers)
    np.testing.assert_array_equal(out.caches[0].lengths, plain.caches[0].lengths)
    np.testing.assert_array_equal(out.caches[0].valid.sum(-1), plain.caches[0].valid.sum(-1))


@pytest.mark.slow
def test_the_stream_pads_to_the_same_bucket():
  params = _params(CONFIG, seed=6)
  tokens, mask = _bucket_prompt(9)
  n = BUCKET_N + 1  # Not the test above's compilation, whichever runs first.
  with compiles.compilations("start") as compiled:
    out = _generate(CONFIG, params, tokens, mask, max_new_tokens=n, max_len=BUCKET_MAX_LEN)
  assert len(compiled) == 1
  np.testing.assert_array_equal(out.caches[0].index, [16 + n - 1] * CONFIG.num_layers)
  caches = transformer.init_caches(CONFIG, 2, BUCKET_MAX_LEN)
  with compiles.compilations("start") as compiled:
    # jax arrays are padded with jax (numpy ones stay numpy); the same compilation.
    stream = generation.generate_stream(transformer.step_fn(CONFIG), params, caches,
                                        jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=n,
                                        sampler=GREEDY, key=jax.random.key(0))
    np.testing.assert_array_equal(np.stack(list(stream), axis=1), out.tokens)
  assert not compiled  # generate's prefill for the bucket 16 served the stream.


@pytest.mark.slow
def test_prompts_keep_their_length_where_no_bucket_fits_the_caches():
  params = _params(CONFIG, seed=7)
  tokens, mask = _prompts([6, 2, 5], P, left_pad=False, seed=7)
  max_len = P + N + 6  # Room for prompts of up to 13 columns.
  plain = _generate(CONFIG, params, tokens, mask, max_len=max_len, prompt_buckets=None)
  for buckets, width in [(generation.DEFAULT_PROMPT_BUCKETS, P), ((4, 8, 12), 8), ((4, 16), P)]:
    out = _generate(CONFIG, params, tokens, mask, max_len=max_len, prompt_buckets=buckets)
    np.testing.assert_array_equal(out.tokens, plain.tokens, err_msg=str(buckets))
    np.testing.assert_array_equal(out.caches[0].index, [width + N - 1] * CONFIG.num_layers)
    assert not bool(kvattn.overflowed(out.caches).any())


def test_bucket_length():
  default = generation.DEFAULT_PROMPT_BUCKETS
  assert [generation.bucket_length(p, default) for p in (1, 16, 17, 1000)] == [16, 16, 32, 1024]
  assert generation.bucket_length(5, default, room=16) == 16
  assert generation.bucket_length(5, default, room=15) == 5  # The bucket has no room.
  assert generation.bucket_length(9, [4, 8]) == 9  # Past the last bucket.
  assert generation.bucket_length(9, None) == 9
  assert generation.bucket_length(2**30, default) == 2**30


@pytest.mark.parametrize("buckets", [[16, 8], [8, 8], [0, 16], [], [16.0], [True, 16], "16", 16])
def test_bad_prompt_buckets_raise(buckets):
  match = r"prompt_buckets should be None or a non-empty sequence of ascending positive ints"
  with pytest.raises(ValueError, match=match):
    generation.bucket_length(5, buckets)
  with pytest.raises(ValueError, match=match):
    _bad(prompt_buckets=buckets)()


@pytest.mark.slow
def test_buckets_count_the_slots_a_cache_already_holds():
  """A conversation going on: the bucket must fit the free slots, not max_len."""
  params = _params(CONFIG)
  history, history_mask = _prompts([20, 20], 20, left_pad=False, seed=7)
  caches = transformer.init_caches(CONFIG, 2, 35)
  _, caches = transformer.step_fn(CONFIG)(params, caches, jnp.asarray(history),
                                          jnp.asarray(history_mask))
  tokens, mask = _prompts([5, 3], 5, left_pad=False, seed=8)
  kw = dict(max_new_tokens=8, sampler=GREEDY, key=jax.random.key(0))
  want = generation.generate(transformer.step_fn(CONFIG), params, caches, tokens, mask,
                             prompt_buckets=None, **kw)
  got = generation.generate(transformer.step_fn(CONFIG), params, caches, tokens, mask, **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert not np.any(np.asarray(got.caches[0].overflow))
  with pytest.raises(
      ValueError, match=r"caches have 15 free slots .* too few for P \+ "
      r"max_new_tokens - 1 = 5 \+ 12 - 1 = 16"):
    generation.generate(transformer.step_fn(CONFIG), params, caches, tokens, mask,
                        **(kw | dict(max_new_tokens=12)))


def test_eos_ids_as_an_array():
  tokens = np.array([[1], [7]], np.int32)
  caches = (jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.int32))
  for eos in (np.array([4, 9]), jnp.array([4, 9], jnp.int32)):
    out = generation.generate(_counting_model, None, caches, tokens, np.ones(
        (2, 1), bool), max_new_tokens=5, sampler=GREEDY, key=jax.random.key(0), eos_id=eos,
                              pad_id=-1)
    np.testing.assert_array_equal(out.tokens, [[2, 3, 4, -1, -1], [8, 9, -1, -1, -1]])


@pytest.mark.slow
def test_a_new_temperature_or_top_p_compiles_nothing():
  """Issue 19: a Sampler's temperature and top_p are traced; only top_k is static."""
  params = _params(CONFIG)
  tokens, mask = _prompts([6, 2, 5], P, False)
  _generate(CONFIG, params, tokens, mask, sampler=sampling.Sampler(0.7, 10, 0.9))
  with compiles.compilations() as compiled:
    outs = [
        _generate(CONFIG, params, tokens, mask, sampler=sampling.Sampler(t, 10, p), seed=3)
        for t, p in [(1.3, 0.5), (0.2, 0.95), (0.0, 0.9)]
    ]
  assert compiled == [], compiled
  # Temperature 0 is greedy, traced or not.
  greedy = _generate(CONFIG, params, tokens, mask, seed=3)
  np.testing.assert_array_equal(outs[2].tokens, greedy.tokens)
  assert np.any(np.asarray(outs[0].tokens) != np.asarray(greedy.tokens))


@pytest.mark.slow
def test_a_plain_function_is_a_sampler_too():
  """Any callable (key, logits) -> tokens works: it is passed as a static Partial."""
  params = _params(CONFIG)
  tokens, mask = _prompts([6, 2, 5], P, False)
  by_function = _generate(CONFIG, params, tokens, mask,
                          sampler=lambda key, logits: sampling.greedy(logits))
  np.testing.assert_array_equal(by_function.tokens, _generate(CONFIG, params, tokens, mask).tokens)
  with pytest.raises(TypeError, match="sampler should be a callable"):
    _generate(CONFIG, params, tokens, mask, sampler=0.7)


@pytest.mark.slow
def test_one_pass_prefill_asks_a_step_fn_for_the_last_logits_only():
  """A step_fn taking `logits_at` computes one column of logits per row in the prefill."""
  params = _params(CONFIG)
  tokens, mask = _prompts([6, 2, 5], P, False)
  base = transformer.step_fn(CONFIG)
  shapes = []

  def with_logits_at(params, caches, tokens, mask, logits_at=None):
    logits, caches = base(params, caches, tokens, mask, logits_at=logits_at)
    shapes.append((tokens.shape[1], logits.shape[1]))
    return logits, caches

  def without(params, caches, tokens, mask):
    return base(params, caches, tokens, mask)

  outs = []
  for fn in (with_logits_at, without):
    caches = transformer.init_caches(CONFIG, B, 16 + N)
    outs.append(
        generation.generate(fn, params, caches, tokens, mask, max_new_tokens=N, sampler=GREEDY,
                            key=jax.random.key(0)).tokens)
  np.testing.assert_array_equal(outs[0], outs[1])
  assert shapes[0] == (16, 1)  # The prefill (prompts bucketed to 16): one column of logits.
  # transformer.step itself: the same numbers as the full logits at those columns.
  caches = transformer.init_caches(CONFIG, B, 16)
  at = jnp.array([5, 1, 4], jnp.int32)
  full, _ = base(params, caches, jnp.asarray(tokens), jnp.asarray(mask))
  picked, _ = base(params, caches, jnp.asarray(tokens), jnp.asarray(mask), logits_at=at)
  np.testing.assert_allclose(picked[:, 0], full[np.arange(B), at], rtol=1e-6, atol=1e-6)


# What a user passes is checked, honoured or refused (issue 20).


@pytest.mark.slow
def test_out_of_vocabulary_prompt_ids_are_refused_and_clipped_under_jit():
  """Concrete ids outside [0, V) raise in generate; traced ones are clipped, never NaN."""
  tokens, mask = _prompts([3, 2], 3, left_pad=False)
  for bad in (CONFIG.vocab_size, 100_000, -1):
    bad_tokens = tokens.copy()
    bad_tokens[1, 1] = bad
    with pytest.raises(
        ValueError, match=rf"prompt_tokens should be ids in \[0, V\)=\[0, 32\): "
        rf"but got {bad} at row 1, column 1"):
      _bad(tokens=bad_tokens)()
  # Padding may hold any id.
  bad_tokens = tokens.copy()
  bad_tokens[1, 2] = 100_000
  _bad(tokens=bad_tokens)()
  # transformer.step under jit: an id past V reads V - 1's embedding, a negative one 0's.
  params, step = _params(CONFIG), jax.jit(transformer.step_fn(CONFIG))
  caches = transformer.init_caches(CONFIG, 1, 4)
  for bad, same in ((100_000, CONFIG.vocab_size - 1), (-5, 0)):
    got, _ = step(params, caches, jnp.array([[3, bad]], jnp.int32), None)
    want, _ = step(params, caches, jnp.array([[3, same]], jnp.int32), None)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_learned_positions_are_never_exceeded_silently():
  """GPT-2-like models: generate refuses to run past max_positions (counting what the
  caches hold); a step past them under jit sets the caches' overflow flag."""
  params, fn = _params(LEARNED), transformer.step_fn(LEARNED)
  assert (fn.vocab_size, fn.max_positions) == (32, 32)
  assert transformer.step_fn(CONFIG).max_positions is None
  tokens, mask = _prompts([5, 3], 6, left_pad=False)
  caches = transformer.init_caches(LEARNED, 2, 64)
  with pytest.raises(ValueError, match=r"32 positions .* = 0 \+ 5 \+ 29 - 1 = 33"):
    generation.generate(fn, params, caches, tokens, mask, max_new_tokens=29)
  generation.generate(fn, params, caches, tokens, mask, max_new_tokens=28)  # 5 + 28 - 1 = 32.
  out = generation.generate(fn, params, caches, tokens, mask, max_new_tokens=27)
  assert not bool(kvattn.overflowed(out.caches).any())
  # The caches now hold 31 positions of row 0: one more token is the 32nd, two pass.
  more, more_mask = generation.continue_from(out, np.zeros((2, 1), np.int32))
  with pytest.raises(ValueError, match=r"= 31 \+ 2 \+ 1 - 1 = 33"):
    generation.generate(fn, params, out.caches, more, more_mask, max_new_tokens=1)
  step = jax.jit(fn)
  _, fits = step(params, out.caches, more[:, :1], None)
  assert not bool(kvattn.overflowed(fits).any())
  logits, past = step(params, out.caches, more, None)
  assert bool(kvattn.overflowed(past).all()) and np.all(np.isfinite(logits))
  with pytest.raises(ValueError, match=r"at most the model's max_positions=32 columns"):
    transformer.forward(params, jnp.zeros((1, 33), jnp.int32), config=LEARNED)


def test_a_row_without_a_real_token_is_refused():
  tokens, mask = _prompts([3, 2], 3, left_pad=False)
  mask[1] = False
  with pytest.raises(
      ValueError, match=r"prompt_mask should mark at least one real token in "
      r"every row: but rows \[1\] have none"):
    _bad(mask=mask)()


@pytest.mark.slow
def test_continue_from_equals_a_fresh_run_over_the_whole_history():
  """out.caches lack each row's newest token: continue_from feeds it first, and the
  next turn's tokens equal generating from scratch over prompt + reply + turn."""
  params, fn = _params(CONFIG), transformer.step_fn(CONFIG)
  tokens, mask = _prompts([4, 2], 4, left_pad=False)
  turn = np.array([[7, 8], [9, 0]], np.int32)
  turn_mask = turn != 0
  out = generation.generate(fn, params, transformer.init_caches(CONFIG, 2, 64), tokens, mask,
                            max_new_tokens=5, eos_id=[3], prompt_buckets=None)
  nxt, nxt_mask = generation.continue_from(out, turn, turn_mask)
  lengths = np.asarray(out.lengths)
  np.testing.assert_array_equal(nxt[:, 0], np.asarray(out.tokens)[[0, 1], lengths - 1])
  assert nxt_mask[:, 0].all()
  second = generation.generate(fn, params, out.caches, nxt, nxt_mask, max_new_tokens=4)
  for row in range(2):  # Each row alone, from scratch.
    history = np.concatenate([
        tokens[row][mask[row]],
        np.asarray(out.tokens)[row, :lengths[row]], turn[row][turn_mask[row]]
    ])[None].astype(np.int32)
    alone = generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 64), history,
                                max_new_tokens=4)
    np.testing.assert_array_equal(second.tokens[row], alone.tokens[0])


@pytest.mark.slow
def test_greedy_needs_no_key_and_no_mask_and_takes_sampling_greedy():
  params, fn = _params(CONFIG), transformer.step_fn(CONFIG)
  tokens = np.array([[5, 6, 7]], np.int32)
  want = generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 16), tokens,
                             np.ones((1, 3), bool), max_new_tokens=4, sampler=GREEDY,
                             key=jax.random.key(3)).tokens
  for kw in ({}, {"sampler": sampling.greedy}, {"sampler": sampling.Sampler(temperature=0.0)}):
    got = generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 16), tokens,
                              max_new_tokens=4, **kw).tokens
    np.testing.assert_array_equal(got, want)
  # Nested lists are prompts too.
  got = generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 16), [[5, 6, 7]],
                            [[True, True, True]], max_new_tokens=4).tokens
  np.testing.assert_array_equal(got, want)
  streamed = list(
      generation.generate_stream(fn, params, transformer.init_caches(CONFIG, 1, 16), tokens,
                                 max_new_tokens=4))
  np.testing.assert_array_equal(np.stack(streamed, 1), want)
  with pytest.raises(ValueError, match=r"key should be a PRNG key .* but got None"):
    generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 16), tokens,
                        max_new_tokens=4, sampler=sampling.Sampler(top_p=0.9))
  with pytest.raises(TypeError, match=r"sampler should take \(key, logits \[B, V\]\)"):
    generation.generate(fn, params, transformer.init_caches(CONFIG, 1, 16), tokens,
                        max_new_tokens=4, sampler=lambda logits: logits.argmax(-1))


@pytest.mark.parametrize("call, error, match", [
    (_bad(eos_id="63"), ValueError, r"eos_id should be None, an int or a .*list of ints: but "
     r"got '63'"),
    (_bad(pad_id="0"), ValueError, r"pad_id should be an int: but got '0'"),
    (_bad(tokens=[[1, 2], [3]]), ValueError, r"prompt_tokens should be a rectangular array"),
    (_bad(mask=[[True, True, True]]), ValueError,
     r"prompt_mask shape should be \(B, T\)=\(2, 3\): but got \(1, 3\)"),
    (_bad(step=42), TypeError, r"step_fn should be callable"),
])
def test_errors_name_the_argument_at_fault(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_a_cache_batch_mismatch_blames_the_caches():
  tokens, mask = _prompts([3, 2], 3, left_pad=False)
  with pytest.raises(ValueError, match=r"caches batch size should be prompt_tokens' B=2: but "
                     r"got 3"):
    generation.generate(transformer.step_fn(CONFIG), _params(CONFIG),
                        transformer.init_caches(CONFIG, 3, 10), tokens, mask, max_new_tokens=2)
  with pytest.raises(TypeError, match=r"config should be a transformer.Config: but got dict"):
    transformer.step_fn({"vocab_size": 32})
