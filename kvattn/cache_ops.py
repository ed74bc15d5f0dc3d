"""Edits of a whole cache: `rewind` drops the newest tokens, `reorder` gathers rows.

Speculative decoding rewinds the draft tokens a verifier rejected; beam search
reorders rows to follow the surviving beams. Both return a new cache that
behaves exactly like one built from the kept (or gathered) inputs.

Shape legend:
  B: batch size
  S: cache capacity (max_len)
  K: number of key/value heads
  H: head dimension
  L: number of layers, for stacked caches (`kvattn.models.transformer.init_caches`)

Each function takes one cache or any pytree of them, stacked ones (leaves
with leading axes, as `kvattn.models.transformer.init_caches` makes) too: the
edit is applied to every cache and every layer, with the same argument.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvattn import layout
from kvattn import masks
from kvattn._cache_tree import check_tree, map_caches
from kvattn._checks import check_cache, check_shape, is_concrete
from kvattn.cache import KVCache

# The leaves with one entry per slot of a row: zeroed where rewind drops a token.
_SLOT_FIELDS = tuple(name for name, field in layout.CACHE.items()
                     if field.dims[:2] == ("B", "S") and name != "valid")
# The leaves with one entry per row: gathered by reorder.
_ROW_FIELDS = tuple(name for name, field in layout.CACHE.items() if field.dims[:1] == ("B",))


def rewind(cache: Any, n: Any) -> Any:
  """Drops the last `n` real tokens of each row, as if they had never been seen.

  A row's real tokens are its valid slots; its last n are the n valid slots
  with the highest slot numbers (padding slots in between are skipped). The
  dropped slots become invalid and their k, v (and int8 scales) zeros;
  `lengths` goes down by the tokens dropped, so the next tokens get the right
  positions (RoPE, learned embeddings); `index` moves back to just after the
  last slot still valid in any row (0 if none), so the next write reuses the
  freed slots. Slots at the end that hold no real token of any row are freed
  too, even with n = 0. `overflow` is sticky and stays as it is.

  For example, with index 5 and n = [1, 2] (1 = valid):

    valid before     valid after
    1 1 0 1 1        1 1 0 1 0
    0 1 1 1 1        0 1 1 0 0     index 5 -> 4, lengths [4, 4] -> [3, 2]

  Rows may keep different numbers of tokens. Under `jit`, n may be traced and
  one compilation serves every value.

  Args:
    cache: the `KVCache` to rewind, or any pytree of them (stacked caches
      too: every layer is rewound by n).
    n: the tokens to drop: a Python int or an integer scalar for every row,
      or an integer `[B]` array, one count per row.

  Returns:
    The rewound `KVCache`, with the same shapes and dtypes.

  Raises:
    TypeError: n is not of an integer dtype.
    ValueError: n's shape is neither () nor (B,). When n's values are known
      (a Python int, a numpy or a concrete jax array): n is negative, more
      than S, or (when `cache.lengths` is concrete too, i.e. outside `jit` and
      `vmap`) more than a row holds.

  Where n is traced its values are unknown when this runs, so nothing can
  raise: each row's count is clamped to [0, lengths[b]] instead. A negative
  count drops nothing, and a count past what the row holds empties the row.
  The tokens actually dropped are `cache.lengths - rewind(cache, n).lengths`;
  compare them with n to detect a clamp.

  A ring cache (`init_cache(..., window=W, rewind_room=...)`) drops the tokens
  by position and keeps its `index` (its slots are reused). It holds S = W + rewind_room
  slots, so from a row that filled them it can drop up to rewind_room + 1 tokens and
  still hold every token the next one must see. More raises when n and the
  lengths are concrete; traced, it sets the sticky `overflow` flag: the
  cache can no longer give exact results.
  """
  if not _single(cache):
    for one in _layers(check_tree("cache", cache)):
      _check_counts(n, one)
    return map_caches(rewind, cache, n)
  check_cache(cache)
  b, s = cache.valid.shape
  n = _check_counts(n, cache)
  count = jnp.clip(n, 0, cache.lengths)
  if cache.ring:
    return _rewind_ring(cache, count)
  # from_end[b, j]: real tokens of row b in slots j..S-1, so 1 at its last real token.
  from_end = jnp.sum(cache.valid, axis=1, keepdims=True, dtype=jnp.int32) - masks.real_before(
      cache.valid)
  drop = cache.valid & (from_end <= count[:, None])
  slot = lax.broadcasted_iota(jnp.int32, (b, s), 1)
  index = jnp.max(jnp.where(cache.valid & ~drop, slot + 1, 0))
  return _drop(cache, drop, count)._replace(index=index.astype(jnp.int32))


def _rewind_ring(cache: KVCache, count: jax.Array) -> KVCache:
  """`rewind` of a ring cache: the tokens at positions >= lengths - count go.

  The ring's slots are reused, so `index` stays. The next token, at position
  p = lengths - count, must see positions p - W + 1 .. p - 1; the ring still
  holds those unless more than `rewind_room + 1` tokens are dropped from a row
  that had already filled its S slots. Then the cache cannot be exact any
  more: `overflow` is set (concrete counts raise in `_check_counts`).
  """
  lengths = cache.lengths - count
  drop = cache.valid & (cache.positions >= lengths[:, None])
  lost = _ring_history_lost(cache, lengths)
  return _drop(cache, drop, count)._replace(overflow=cache.overflow | jnp.any(lost))


def _drop(cache: KVCache, drop: jax.Array, count: jax.Array) -> KVCache:
  """The cache without the slots `drop` (bool `[B, S]`): invalid and zero, `count` fewer."""
  def zero(x):
    where = drop.reshape(drop.shape + (1,) * (x.ndim - 2))
    return jnp.where(where, jnp.zeros_like(x), x)

  return cache._replace(
      **{
          name: zero(getattr(cache, name)) for name in _SLOT_FIELDS
          if getattr(cache, name) is not None
      },
      valid=cache.valid & ~drop,
      lengths=cache.lengths - count,
  )


def _ring_history_lost(cache: KVCache, lengths) -> jax.Array:
  """bool `[B]`: rows whose next token's window reaches below what the ring still holds."""
  needed = jnp.maximum(lengths - cache.window + 1, 0)  # The oldest position it must see.
  # The oldest position the ring holds: its tokens are contiguous and up to
  # lengths - 1 (no padding takes a ring slot), so lengths minus their count
  # (fewer than S after an earlier rewind).
  held = cache.lengths - jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
  return (needed < held) & (lengths > 0)


def reorder(cache: Any, indices: Any) -> Any:
  """Gathers rows: row b of the result is row `indices[b]` of `cache`.

  For beam search, where the surviving beams replace the others: rows may be
  repeated or left out. Every per-row leaf (k, v, valid, lengths and the int8
  scales) is gathered; `index` and `overflow` are shared by the batch and
  stay as they are. Under `jit`, indices may be traced and one compilation
  serves every value.

  Args:
    cache: the `KVCache` to reorder, or any pytree of them (stacked caches
      too: every layer's rows are gathered alike).
    indices: integer `[B]`, the old row of each new row, in [0, B).

  Returns:
    The reordered `KVCache`, with the same shapes and dtypes.

  Raises:
    TypeError: indices are not of an integer dtype.
    ValueError: indices' shape is not (B,), or (when their values are known:
      a numpy or a concrete jax array) an index is outside [0, B).

  Where indices are traced, each is clamped to [0, B - 1] instead: a
  negative index takes row 0 and one past the end takes row B - 1 (no
  Python-style counting from the end).
  """
  if not _single(cache):
    for one in _layers(check_tree("cache", cache)):
      _check_indices(indices, one.batch_size)
    return map_caches(reorder, cache, indices)
  check_cache(cache)
  indices = _check_indices(indices, cache.batch_size)
  return cache._replace(
      **{
          name: jnp.take(getattr(cache, name), indices, axis=0, mode="clip") for name in _ROW_FIELDS
          if getattr(cache, name) is not None
      })


def _check_indices(indices: Any, b: int) -> jax.Array:
  """reorder's indices checked as it documents, as int32 `[B]` clamped to [0, B)."""
  indices = _as_int_array("indices", indices)
  check_shape("indices", indices, "(B,)", (b,))
  if is_concrete(indices):
    values = np.asarray(indices)
    if np.any((values < 0) | (values >= b)):
      raise ValueError(f"indices should be in [0, B)=[0, {b}): but got {values.tolist()}")
  return jnp.clip(jnp.asarray(indices, jnp.int32), 0, b - 1)


def _single(cache: Any) -> bool:
  """True for one unstacked KVCache (edited directly); False for stacks and other pytrees."""
  return isinstance(cache, KVCache) and getattr(cache.k, "ndim", None) == 4


def _layers(caches: list[KVCache]) -> list[KVCache]:
  """Each layer of each cache, with the leaves the checks read (not k, v: no copies).

  Concrete leaves are indexed with numpy; traced ones (under jit) are left to
  the checks inside the mapped edit.
  """
  out = []
  for cache in caches:
    lead = cache.k.shape[:-4]
    if not is_concrete(cache.lengths):
      continue
    if not lead:
      out.append(cache)
      continue
    small = cache._replace(k=jax.ShapeDtypeStruct(cache.k.shape[-4:], cache.k.dtype), v=None,
                           k_scale=None, v_scale=None)
    for i in np.ndindex(*lead):

      def at(x, i=i):
        return x if x is None or isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)[i]

      out.append(
          small._replace(**{
              f: at(getattr(small, f))
              for f in ("valid", "lengths", "index", "overflow", "positions")
          }))
  return out


def _check_counts(n: Any, cache: KVCache) -> jax.Array:
  """n checked as `rewind` documents, as int32 `[B]`."""
  b, s = cache.valid.shape
  n = _as_int_array("n", n)
  if n.shape not in ((), (b,)):
    raise ValueError(f"n shape should be () or (B,)=({b},): but got {n.shape}")
  if is_concrete(n):
    values = np.asarray(n)
    if np.any(values < 0):
      raise ValueError(f"n should be non-negative: but got {values.tolist()}")
    if is_concrete(cache.lengths):
      lengths = np.asarray(cache.lengths)
      if np.any(values > lengths):
        raise ValueError(f"n should be at most the real tokens of each row, "
                         f"cache.lengths={lengths.tolist()}: but got {values.tolist()}")
    if np.any(values > s):
      raise ValueError(f"n should be at most the cache's max_len S={s}: but got "
                       f"{values.tolist()}")
    if cache.ring and is_concrete(cache.lengths):
      lengths = np.asarray(cache.lengths) - np.broadcast_to(values, (b,))
      if np.any(np.asarray(_ring_history_lost(cache, jnp.asarray(lengths, jnp.int32)))):
        raise ValueError(
            f"n should be at most rewind_room + 1 = {s - int(cache.window) + 1} for the rows "
            f"of this ring cache that fill its {s} slots (cache.lengths="
            f"{np.asarray(cache.lengths).tolist()}): but got {values.tolist()}")
  return jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b,))


def _as_int_array(name: str, x: Any):
  """x as an array (a Python int or list through numpy); TypeError unless of an integer dtype."""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if x.dtype == jnp.bool_ or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} dtype should be an integer dtype such as int32: but got {x.dtype}")
  return x
