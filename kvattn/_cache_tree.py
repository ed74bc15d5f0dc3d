"""A model's caches as a pytree of `KVCache`s: edit each one, check them at the boundary.

Decoding loops (`kvattn.speculative`, `kvattn.beam_search`) take any pytree
of caches, as `kvattn.generate` does: one stacked `KVCache` (leaves with a
leading L axis, `kvattn.models.transformer.init_caches`), a list of them, a
dict. The edits of `kvattn.cache_ops` act on one unstacked cache; `map_caches`
applies one to every cache in the tree, mapped over its leading axes.

Shape legend:
  B: batch size
  S: cache capacity (max_len)
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from kvattn.cache import KVCache

# k is [..., B, S, K, H]: the axes before these four are stacking axes (layers).
_CACHE_RANK = 4


def _is_cache(x: Any) -> bool:
  return isinstance(x, KVCache)


def caches_in(caches: Any) -> list[KVCache]:
  """The `KVCache`s in a pytree, in leaf order."""
  return [c for c in jax.tree.leaves(caches, is_leaf=_is_cache) if _is_cache(c)]


class Room(NamedTuple):
  """One `KVCache`'s room: what a row can take, and the counters of what it has taken.

  Fields:
    batch: B, the cache's rows.
    ring: True for a ring cache.
    capacity: the tokens a row can take: S slots of a linear cache, a ring's
      `max_positions` (its slots are reused). Static.
    used: the counter of `capacity` taken: int32 `index` `[]` (slots written)
      of a linear cache, `lengths` `[B]` (positions) of a ring; with the
      stacking axes in front. Maybe traced.
    lengths: int32 `[B]` real tokens per row, with the stacking axes in
      front. Maybe traced.
  """

  batch: int
  ring: bool
  capacity: int
  used: Any
  lengths: Any


def rooms(caches: Any) -> list[Room]:
  """The `Room` of each `KVCache` in a pytree, in leaf order.

  The one walk of the decoding loops over their caches' room: `check_caches`
  here, and `kvattn.decoding.capacity` and `max_len` for `kvattn.generate`.
  """
  return [_room(c) for c in caches_in(caches)]


def _room(cache: KVCache) -> Room:
  ring = cache.ring
  return Room(batch=cache.batch_size, ring=ring,
              capacity=cache.max_positions if ring else cache.num_slots,
              used=cache.lengths if ring else cache.index, lengths=cache.lengths)


def map_caches(edit: Callable[[KVCache, Any], KVCache], caches: Any, arg: Any) -> Any:
  """Applies `edit(cache, arg)` to every `KVCache` in caches, vmapped over leading axes.

  `arg` is shared by every cache and every stacked layer (`in_axes=None`);
  e.g. `map_caches(kvattn.rewind, caches, n)` rewinds every layer by n.
  """
  def one(cache):
    fn = edit
    for _ in range(cache.k.ndim - _CACHE_RANK):
      fn = jax.vmap(fn, in_axes=(0, None))
    return fn(cache, arg)

  return jax.tree.map(one, caches, is_leaf=_is_cache)


def check_tree(name: str, caches: Any) -> list[KVCache]:
  """The `KVCache`s of a pytree; TypeError unless there is one and every leaf is in one.

  A cache edit (rewind, reorder) would not know what to do with other state.
  """
  found = caches_in(caches)
  stray = [x for x in jax.tree.leaves(caches, is_leaf=_is_cache) if not _is_cache(x)]
  if not found or stray:
    kind = type(stray[0]).__name__ if stray else "no KVCache"
    raise TypeError(f"{name} should be a KVCache or a pytree whose leaves are all in "
                    f"KVCaches: but got {kind}")
  for cache in found:
    if cache.layer is not None:
      raise TypeError(f"{name} should hold whole caches, not layer views (kvattn.layer_view): "
                      f"pass kvattn.stack_of(view)")
    shape = getattr(cache.k, "shape", None)
    if shape is None or len(shape) < _CACHE_RANK:
      raise ValueError(f"{name} k shape should be (..., B, S, K, H): but got {shape}")
  return found


def check_caches(name: str, caches: Any, batch: int, needed: int, why: str,
                 rewind: int = 0) -> None:
  """Raises unless caches is a pytree of `KVCache`s with B rows and room for `needed` slots.

  Every leaf must belong to a `KVCache`: a cache edit (rewind, reorder) would
  not know what to do with other state. `why` says where `needed` comes
  from, e.g. "P + M - 1 = 5 + 8 - 1". A ring cache needs `needed` positions
  (`max_positions`, when concrete) rather than slots, and room to rewind
  `rewind` tokens exactly (`rewind_room >= rewind - 1`).
  """
  for cache in check_tree(name, caches):
    room = _room(cache)
    if room.batch != batch:
      raise ValueError(f"{name} batch size should be B={batch}: but got {room.batch} (k shape "
                       f"{cache.k.shape})")
    if room.capacity < needed:
      what = "max_len (a ring's max_positions)" if room.ring else "max_len"
      got = room.capacity if room.ring else f"S={room.capacity}"
      raise ValueError(f"{name} {what} should be at least {why} = {needed}: but got {got}")
    if room.ring:
      _check_rewind(name, cache, rewind)


def _check_rewind(name: str, cache: KVCache, rewind: int) -> None:
  """A ring cache's rewind_room, enough to rewind `rewind` tokens exactly."""
  slots = cache.num_slots
  room = slots - cache.window
  # A ring that never wraps (slots >= max_positions) rewinds any count exactly.
  if rewind and slots < cache.max_positions and room < rewind - 1:
    raise ValueError(f"{name} is a ring cache: its rewind_room should be at least {rewind - 1} "
                     f"to rewind {rewind} tokens exactly: but got {room}")
