"""Each mask builder against a literal 0/1 matrix (the same ones its docstring draws)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn import masks


def _m(rows):
  return np.array([[c == "1" for c in r.split()] for r in rows])


def test_causal_mask_with_offset():
  np.testing.assert_array_equal(masks.causal_mask(3, 5, offset=2),
                                _m(["1 1 1 0 0", "1 1 1 1 0", "1 1 1 1 1"]))


def test_causal_mask_square():
  np.testing.assert_array_equal(masks.causal_mask(3, 3), _m(["1 0 0", "1 1 0", "1 1 1"]))


def test_prefix_lm_mask():
  np.testing.assert_array_equal(masks.prefix_lm_mask(4, 4, prefix_len=2),
                                _m(["1 1 0 0", "1 1 0 0", "1 1 1 0", "1 1 1 1"]))


def test_window_mask_compares_token_positions():
  # Row 0: positions 0..3. Row 1: a padding column between positions 0 and 1
  # takes position 1 too; the window counts positions, not columns.
  pos = jnp.array([[0, 1, 2, 3], [0, 1, 1, 2]])
  got = masks.window_mask(pos, pos, 2) & (pos[:, None, :] <= pos[:, :, None])
  np.testing.assert_array_equal(got[0], masks.sliding_window_mask(4, 4, window=2))
  np.testing.assert_array_equal(got[1], [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]])


def test_sliding_window_mask():
  np.testing.assert_array_equal(masks.sliding_window_mask(4, 4, window=2),
                                _m(["1 0 0 0", "1 1 0 0", "0 1 1 0", "0 0 1 1"]))


def test_padding_mask():
  valid = jnp.array([[False, True, True]])
  np.testing.assert_array_equal(
      masks.padding_mask(valid, valid)[0], _m(["0 0 0", "0 1 1", "0 1 1"]))


def test_combine_masks_broadcasts_and_skips_none():
  valid = jnp.array([[False, True, True]])
  got = masks.combine_masks(masks.causal_mask(3, 3), None, masks.padding_mask(valid, valid))
  assert got.shape == (1, 3, 3)
  np.testing.assert_array_equal(got[0], _m(["0 0 0", "0 1 0", "0 1 1"]))
  assert masks.combine_masks(None, None) is None


def test_offset_may_be_traced():
  """Under jit the cache index is a tracer; masks take it as their offset."""
  got = jax.jit(lambda o: masks.causal_mask(2, 4, offset=o))(jnp.int32(1))
  np.testing.assert_array_equal(got, _m(["1 1 0 0", "1 1 1 0"]))
  got = jax.jit(lambda p: masks.prefix_lm_mask(3, 3, prefix_len=p))(jnp.int32(2))
  np.testing.assert_array_equal(got, _m(["1 1 0", "1 1 0", "1 1 1"]))


@pytest.mark.parametrize("call, match", [
    (lambda: masks.causal_mask(0, 4), r"num_queries should be a positive int: but got 0"),
    (lambda: masks.prefix_lm_mask(2, True, 1), r"num_keys should be a positive int: but got True"),
    (lambda: masks.sliding_window_mask(2, 2, 0), r"window should be a positive int: but got 0"),
])
def test_bad_sizes_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_numpy_int_sizes_are_accepted():
  np.testing.assert_array_equal(masks.causal_mask(np.int64(2), 2), _m(["1 0", "1 1"]))
