"""Tests of the decoding contract: prompts, the last real token, EOS and pad, the caches' room."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn import beam_search
from kvattn import decoding
from kvattn import generation
from kvattn import speculative
from kvattn._cache_tree import check_caches

K, H = 2, 4


def _stack(cache, layers):
  """L copies of a cache, stacked on a leading axis (as a model's caches are)."""
  return jax.tree.map(lambda x: jnp.stack([x] * layers), cache)


def _caches():
  """A tuple of two stacks of 2 layers, B = 3: a linear cache (S = 20) and a ring (W = 4,
  max_len 50), with written slots and real tokens set by hand, and a stray non-cache leaf."""
  linear = _stack(kvattn.init_cache(3, 20, K, H), 2)
  linear = linear._replace(index=jnp.array([5, 7], jnp.int32),
                           lengths=jnp.array([[5, 4, 2], [7, 6, 1]], jnp.int32))
  ring = _stack(kvattn.init_cache(3, 50, K, H, window=4, rewind_room=2), 2)
  ring = ring._replace(lengths=jnp.array([[3, 9, 1], [2, 8, 2]], jnp.int32))
  return (linear, ring, jnp.zeros((), jnp.int32))


def test_last_real_and_take_at_match_a_numpy_loop():
  rng = np.random.default_rng(0)
  b, t, v = 16, 7, 5
  mask = rng.random((b, t)) < 0.4
  mask[0] = False  # A row without a real token gets T - 1.
  mask[1] = True
  logits = rng.standard_normal((b, t, v)).astype(np.float32)
  tokens = rng.integers(0, 100, (b, t)).astype(np.int32)
  want = np.array([max((j for j in range(t) if mask[i, j]), default=t - 1) for i in range(b)])
  last = decoding.last_real(jnp.asarray(mask))
  assert last.dtype == jnp.int32
  np.testing.assert_array_equal(last, want)
  np.testing.assert_array_equal(decoding.take_at(jnp.asarray(logits), last), logits[np.arange(b),
                                                                                    want])
  np.testing.assert_array_equal(decoding.take_at(jnp.asarray(tokens), last), tokens[np.arange(b),
                                                                                    want])
  assert decoding.longest_prompt(mask) == max(mask.sum(axis=1))


def test_capacity_walks_a_tuple_of_stacks_with_a_ring_and_a_linear_cache():
  caches = _caches()
  room = decoding.capacity(caches)
  # Linear: 20 slots minus the most written (7); ring: 50 positions minus the longest row (9);
  # held: the most real tokens of any row of either cache.
  assert room == decoding.Capacity(free=13, positions=41, held=9, known=True)
  assert decoding.max_len(caches) == 20  # A ring's slots are reused: it has no max_len S.
  assert decoding.capacity(caches[1:]) == decoding.Capacity(None, 41, 9, True)
  assert decoding.capacity(caches[2]) == decoding.Capacity(None, None, 0, False)
  assert decoding.max_len(caches[1:]) is None

  seen = []

  @jax.jit
  def traced(caches):
    seen.append((decoding.capacity(caches), decoding.max_len(caches)))
    return caches[2]

  traced(caches)
  assert seen == [(decoding.Capacity(None, None, 0, False), 20)]


def test_check_caches_reads_the_same_room():
  linear, ring, _ = _caches()
  check_caches("caches", (linear, ring), 3, 20, "why")
  with pytest.raises(ValueError, match=r"caches max_len should be at least why = 21: but got "
                     r"S=20"):
    check_caches("caches", (linear, ring), 3, 21, "why")
  with pytest.raises(
      ValueError, match=r"caches max_len \(a ring's max_positions\) should be at "
      r"least why = 51: but got 50"):
    check_caches("caches", ring, 3, 51, "why")
  with pytest.raises(ValueError, match=r"caches batch size should be B=2: but got 3"):
    check_caches("caches", ring, 2, 1, "why")
  with pytest.raises(ValueError, match=r"rewind_room should be at least 3 to rewind 4"):
    check_caches("caches", ring, 3, 1, "why", rewind=4)
  check_caches("caches", ring, 3, 1, "why", rewind=3)


@pytest.mark.parametrize(
    "eos_id", ["2", [], [1, "2"], 2.5,
               np.zeros((2, 2), np.int32),
               np.zeros((0,), np.int32), True])
def test_check_eos_refuses(eos_id):
  with pytest.raises(
      ValueError, match=r"eos_id should be None, an int or a non-empty list of "
      r"ints: but got"):
    decoding.check_eos(eos_id)


@pytest.mark.parametrize("pad_id", ["0", 0.0, None, np.zeros((1,), np.int32), np.float32(0), False])
def test_check_pad_refuses(pad_id):
  with pytest.raises(ValueError, match=r"pad_id should be an int: but got"):
    decoding.check_pad(pad_id)


def test_eos_and_pad_take_ints_lists_and_int_arrays():
  for eos_id in (None, 3, np.int64(3), [3, 5], (3,), np.array([3, 5]), jnp.array(3)):
    decoding.check_eos(eos_id)
  for pad_id in (0, np.int32(0), jnp.array(0, jnp.int32)):
    decoding.check_pad(pad_id)
  tokens = jnp.array([[1, 3, 5], [5, 0, 3]], jnp.int32)
  np.testing.assert_array_equal(decoding.is_eos(tokens, 3), [[0, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(decoding.is_eos(tokens, [3, 5]), [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(decoding.eos_ids(np.array([3, 5])), [3, 5])


def test_prompts_as_arrays_and_their_checks():
  tokens, mask = decoding.as_prompts([[1, 2], [3, 4]])
  assert isinstance(tokens, np.ndarray) and mask.dtype == np.bool_ and mask.all()
  assert decoding.check_prompts(tokens, mask) == (2, 2)
  with pytest.raises(ValueError, match=r"prompt_tokens should be a rectangular array"):
    decoding.as_prompts([[1, 2], [3]])
  with pytest.raises(ValueError, match=r"prompt_tokens dtype should be an integer"):
    decoding.check_prompts(np.ones((2, 3), np.float32), np.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r"prompt_tokens should hold at least one token"):
    decoding.check_prompts(np.ones((2, 0), np.int32), np.ones((2, 0), bool))
  with pytest.raises(ValueError, match=r"prompt_tokens shape should be \(B, P\)"):
    decoding.check_prompts(np.ones((3,), np.int32), np.ones((3,), bool))
  with pytest.raises(ValueError, match=r"prompt_mask shape should be \(B, T\)=\(2, 3\)"):
    decoding.check_prompts(np.ones((2, 3), np.int32), np.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"prompt_mask dtype should be bool"):
    decoding.check_prompts(np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
  with pytest.raises(TypeError, match=r"draft_step_fn should be callable: but got int"):
    decoding.check_step_fn(3, "draft_step_fn")


def test_prompt_values_against_the_step_fns_vocabulary_and_positions():
  def step_fn(params, caches, tokens, mask):
    raise AssertionError("never called")

  step_fn.vocab_size, step_fn.max_positions = 10, 20
  caches = _caches()  # held: 9 real tokens in the fullest row.
  tokens = np.array([[1, 2, 3], [4, 11, 0]], np.int32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
  decoding.check_prompt_values(step_fn, caches, tokens, mask, 9)  # 11 is padding.
  with pytest.raises(ValueError, match=r"= 9 \+ 3 \+ 10 - 1 = 21"):
    decoding.check_prompt_values(step_fn, caches, tokens, mask, 10)
  with pytest.raises(ValueError, match=r"ids in \[0, V\)=\[0, 10\): but got 11 at row 1, "
                     r"column 1"):
    decoding.check_prompt_values(step_fn, caches, tokens, np.ones((2, 3), bool), 1)
  empty_row = np.array([[1, 1, 1], [0, 0, 0]], bool)
  with pytest.raises(ValueError, match=r"rows \[1\] have none"):
    decoding.check_prompt_values(step_fn, caches, tokens, empty_row, 1)


def test_the_contract_is_importable_where_it_was():
  for name in ("StepFn", "Sampler", "is_eos", "check_eos", "check_pad", "check_prompt_values"):
    assert getattr(generation, name) is getattr(decoding, name), name
  assert speculative.StepFn is beam_search.StepFn is decoding.StepFn
