"""Attention masks as tiny functions of positions.

Every mask is boolean, True where a query may attend to a key, built from
`lax.broadcasted_iota` comparisons so offsets may be traced values (a cache
index under `jit`). Combine masks with `combine_masks` (logical AND).

Shape legend:
  B: batch size
  T: number of queries
  S: number of keys
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvattn._checks import check_positive_ints


def real_before(mask: jax.Array) -> jax.Array:
  """int32 `[B, T]`: the real tokens before each token of its row (mask bool `[B, T]`).

  A token's position in its own sequence, counting real tokens only (left
  padding does not shift it); a padding token gets the next real token's.
  The one place this count is written: positions for RoPE and learned
  embeddings, ring slots and windows all start from it.
  """
  m = mask.astype(jnp.int32)
  return jnp.cumsum(m, axis=1) - m


def last_real(mask: jax.Array) -> jax.Array:
  """int32 `[B]`: the column of each row's last real token (mask bool `[B, T]`).

  Not column T - 1 under right padding. A row without a real token gets
  T - 1 (callers refuse such rows where they can).
  """
  t = mask.shape[1]
  return t - 1 - jnp.argmax(mask[:, ::-1], axis=1).astype(jnp.int32)


def _positions(num_queries: int, num_keys: int, offset) -> tuple[jax.Array, jax.Array]:
  """Query and key positions as broadcastable `[T, S]` int32 grids."""
  check_positive_ints(num_queries=num_queries, num_keys=num_keys)
  q = lax.broadcasted_iota(jnp.int32, (num_queries, num_keys), 0)
  k = lax.broadcasted_iota(jnp.int32, (num_queries, num_keys), 1)
  return q + jnp.asarray(offset, jnp.int32), k


def causal_mask(num_queries: int, num_keys: int, offset=0) -> jax.Array:
  """Returns bool `[T, S]`: query `i` (at position `offset + i`) sees keys `<= offset + i`.

  `causal_mask(3, 5, offset=2)`:

      1 1 1 0 0
      1 1 1 1 0
      1 1 1 1 1
  """
  q, k = _positions(num_queries, num_keys, offset)
  return k <= q


def prefix_lm_mask(num_queries: int, num_keys: int, prefix_len, offset=0) -> jax.Array:
  """Returns bool `[T, S]`: causal, plus every query sees the first `prefix_len` keys.

  The prefix is attended bidirectionally (a prompt in a prefix-LM); the rest
  stays causal. `prefix_lm_mask(4, 4, prefix_len=2)`:

      1 1 0 0
      1 1 0 0
      1 1 1 0
      1 1 1 1
  """
  _, k = _positions(num_queries, num_keys, offset)
  return causal_mask(num_queries, num_keys, offset) | (k < jnp.asarray(prefix_len, jnp.int32))


def sliding_window_mask(num_queries: int, num_keys: int, window: int, offset=0) -> jax.Array:
  """Returns bool `[T, S]`: query at position `p` sees keys in `(p - window, p]`.

  `sliding_window_mask(4, 4, window=2)`:

      1 0 0 0
      1 1 0 0
      0 1 1 0
      0 0 1 1
  """
  check_positive_ints(window=window)
  q, k = _positions(num_queries, num_keys, offset)
  return (k <= q) & (k > q - window)


def window_mask(query_positions: jax.Array, key_positions: jax.Array, window) -> jax.Array:
  """Returns bool `[B, T, S]`: keys within the window of each query, by token position.

  True where `key_position > query_position - window`: the sliding window
  of a ring cache, on positions that count real tokens only (so padding
  between two tokens does not push one out of the other's window). Combine
  with a causal or padding mask; `window` may be traced.
  """
  return key_positions[:, None, :] > query_positions[:, :, None] - window


def padding_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Returns bool `[B, T, S]`: True where both the query and the key are real tokens.

  With `query_valid = [[0, 1, 1]]` and `key_valid = [[0, 1, 1]]` (one left pad):

      0 0 0
      0 1 1
      0 1 1
  """
  return query_valid[:, :, None] & key_valid[:, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """ANDs the masks that are not None, broadcasting their shapes; None if all are None.

  `combine_masks(causal_mask(3, 3), padding_mask(v, v))` with `v = [[0, 1, 1]]`:

      0 0 0
      0 1 0
      0 1 1
  """
  present = [m for m in masks if m is not None]
  if not present:
    return None
  # Broadcast explicitly: works under jax_numpy_rank_promotion="raise" too,
  # e.g. a [T, S] causal mask with a [B, T, S] padding mask.
  shape = jnp.broadcast_shapes(*(m.shape for m in present))
  out = jnp.broadcast_to(present[0], shape)
  for m in present[1:]:
    out = out & jnp.broadcast_to(m, shape)
  return out
