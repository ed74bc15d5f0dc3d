"""Page management: reserve, release and fork, as jittable pure functions of a `PagedCache`.

Pages come from the free pool (refs == 0), lowest page id first; a slot's
table row holds its pages in order, `NO_PAGE` after them. None of these
functions raises under `jit`: running out of pages is reported per sequence
(`reserve`'s `fits`, `fork`'s `ok`), and nothing else changes for that
sequence. Each takes one layer's cache or a stack of layers' (its page
table is kept once for every layer; `fork` copies a partial page in every
layer).

Shape legend:
  NP: pages in the pool
  PS: tokens per page
  SQ: sequence slots
  PPS: pages per sequence slot
  B: sequences listed in one call (seq_slots)
  F: forks in one call
  E: requests for pages in one call
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn._checks import check_shape, is_concrete
from kvattn.paged.cache import NO_PAGE, PAGE_LEAVES, PagedCache, check_count, check_paged_cache
from kvattn.paged.cache import check_slots, listed


def pages_in_use(cache: PagedCache) -> jax.Array:
  """int32 scalar: the pages some slot holds (refs > 0)."""
  return jnp.sum(cache.refs > 0, dtype=jnp.int32)


def held(cache: PagedCache) -> jax.Array:
  """int32 `[SQ]`: the pages each slot holds (the leading entries of its table row)."""
  return jnp.sum(cache.page_table != NO_PAGE, axis=1, dtype=jnp.int32)


def _take_free(refs: jax.Array, need: jax.Array, most: int) -> tuple[jax.Array, jax.Array]:
  """Free pages for each request, lowest page ids first, in request order.

  A request gets all its pages or none: request i is granted when its need
  fits in what the requests before it left free (a scan over the requests,
  so a large request that does not fit leaves room to smaller later ones).

  Args:
    refs: `[NP]` reference counts; 0 = free.
    need: int32 `[E]` pages each request needs (0 for none).
    most: a static bound on any request's need.

  Returns:
    `(granted [E] bool, pages [E, most] int32)`: row i's first need[i]
    entries are its pages when granted, `NO_PAGE` elsewhere.
  """
  num_pages = refs.shape[0]
  free = jnp.sum(refs == 0, dtype=jnp.int32)

  def grant(used, n):
    ok = used + n <= free
    return used + jnp.where(ok, n, 0), ok

  _, granted = lax.scan(grant, jnp.zeros((), jnp.int32), need)
  got = jnp.where(granted, need, 0)
  first = jnp.cumsum(got) - got  # Each request's first rank among the free pages.
  size = min(num_pages, need.shape[0] * most)
  free_ids = jnp.nonzero(refs == 0, size=size, fill_value=NO_PAGE)[0].astype(jnp.int32)
  column = lax.broadcasted_iota(jnp.int32, (need.shape[0], most), 1)
  rank = jnp.clip(first[:, None] + column, 0, size - 1)
  return granted, jnp.where(column < got[:, None], free_ids[rank], NO_PAGE)


def _or_drop(ids: jax.Array, keep: jax.Array, num_pages: int) -> jax.Array:
  """Page ids to scatter at: NP (dropped by `mode="drop"`) unless kept and in [0, NP).

  Never NO_PAGE itself: jax reads a negative index from the end.
  """
  return jnp.where(keep & (ids >= 0) & (ids < num_pages), ids, num_pages)


def reserve(cache: PagedCache, seq_slots: jax.Array, counts: jax.Array,
            num_seqs: int | jax.Array | None = None) -> tuple[PagedCache, jax.Array]:
  """Gives each listed slot the pages for `counts` more tokens, all of them or none.

  A slot already holding pages for some of them gets only the rest; pages
  come from the free pool, lowest page id first, slots in listed order. A
  slot that does not fit (its length plus its count past PPS * PS, fewer
  free pages than it needs after the slots listed before it, or exhausted)
  gets no page, is reported, and nothing else changes for it: its cached
  tokens stay, and no other slot is affected. Call it before each
  `paged_attention` step with each sequence's new tokens.

  Args:
    cache: the `PagedCache`.
    seq_slots: int `[B]` slots.
    counts: int `[B]` new tokens each slot will take (>= 0).
    num_seqs: entries from num_seqs on are ignored; None for all B.

  Returns:
    `(cache, fits)`: fits bool `[B]`, True where the slot now has pages for
    its length plus its count (False for ignored entries).
  """
  check_paged_cache(cache)
  check_shape("seq_slots", seq_slots, "(B,)", (None,))
  b = seq_slots.shape[0]
  check_count(b if num_seqs is None else num_seqs, b)
  check_slots("seq_slots", seq_slots, cache.max_seqs, num_seqs)
  check_shape("counts", counts, "(B,)", (b,))
  if not jnp.issubdtype(counts.dtype, jnp.integer):
    raise ValueError(f"counts dtype should be an integer dtype: but got {counts.dtype}")
  if is_concrete(counts):
    values = np.asarray(counts)
    if ((values < 0) | (values > cache.capacity)).any():
      raise ValueError(f"counts should be in [0, PPS * PS={cache.capacity}]: but got "
                       f"{values.tolist()}")
  num = b if num_seqs is None else num_seqs
  return _reserve(cache, seq_slots.astype(jnp.int32), counts.astype(jnp.int32), num)


def _reserve(cache: PagedCache, seq_slots, counts, num_seqs) -> tuple[PagedCache, jax.Array]:
  """`reserve` without the checks."""
  ps, pps = cache.page_size, cache.pages_per_seq
  ok = listed(seq_slots, num_seqs, cache.max_seqs)
  slot = jnp.where(ok, seq_slots, 0)
  total = cache.lengths[slot] + jnp.maximum(counts, 0)
  has = held(cache)[slot]
  need = jnp.maximum((total + ps - 1) // ps - has, 0)
  ok &= (total <= pps * ps) & ~cache.exhausted[slot]
  granted, pages = _take_free(cache.refs, jnp.where(ok, need, 0), pps)
  fits = ok & granted
  # Slot i's new pages go to its table columns has[i], has[i] + 1, ...
  column = lax.broadcasted_iota(jnp.int32, (slot.shape[0], pps), 1)
  rank = jnp.clip(column - has[:, None], 0, pps - 1)
  new = jnp.take_along_axis(pages, rank, axis=1)
  rows = cache.page_table[slot]
  rows = jnp.where(fits[:, None] & (column >= has[:, None]) & (new != NO_PAGE), new, rows)
  page_table = cache.page_table.at[jnp.where(fits, slot, cache.max_seqs)].set(rows, mode="drop")
  refs = cache.refs.at[_or_drop(pages, fits[:, None], cache.num_pages)].add(1, mode="drop")
  return cache._replace(page_table=page_table, refs=refs), fits


def release(cache: PagedCache, slot_mask: jax.Array) -> PagedCache:
  """Empties the slots of `slot_mask` (bool `[SQ]`): their pages go back to the pool.

  Each page of a released slot loses a reference (a page a fork still
  shares stays in use); the slot's table row is cleared, its length set to
  0 and its `exhausted` flag reset.
  """
  check_paged_cache(cache)
  check_shape("slot_mask", slot_mask, "(SQ,)", (cache.max_seqs,))
  if slot_mask.dtype != jnp.bool_:
    raise ValueError(f"slot_mask dtype should be bool: but got {slot_mask.dtype}")
  return _release(cache, slot_mask)


def _release(cache: PagedCache, slot_mask) -> PagedCache:
  table = cache.page_table
  refs = cache.refs.at[_or_drop(table, slot_mask[:, None], cache.num_pages)].add(-1, mode="drop")
  return cache._replace(page_table=jnp.where(slot_mask[:, None], NO_PAGE,
                                             table), lengths=jnp.where(slot_mask, 0, cache.lengths),
                        exhausted=jnp.where(slot_mask, False,
                                            cache.exhausted), refs=jnp.maximum(refs, 0))


def fork(cache: PagedCache, src: jax.Array, dst: jax.Array) -> tuple[PagedCache, jax.Array]:
  """Makes each slot `dst[f]` a copy of slot `src[f]` that shares its full pages.

  `dst` is released first. It then holds src's full pages (their
  reference counts go up: no copy) and, when src's last page is partly
  filled, a fresh page with a copy of it, so that later writes of either
  slot never reach the other's tokens. Pages src reserved past its length
  are not shared. dst gets src's length and `exhausted` flag. A fork that
  finds no free page for the copy fails: dst stays released.

  Args:
    cache: the `PagedCache`.
    src: int `[F]` (or a scalar) slots to copy.
    dst: int `[F]` (or a scalar) slots to fill, distinct, none of them a src.

  Returns:
    `(cache, ok)`: ok bool, src's shape, True where the fork was made.
  """
  check_paged_cache(cache)
  src, dst = (jnp.asarray(x) if isinstance(x, (int, np.integer)) else x for x in (src, dst))
  for name, x in (("src", src), ("dst", dst)):
    if getattr(x, "ndim", None) not in (0, 1) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} should be an int or an integer array (F,): but got "
                       f"{getattr(x, 'shape', x)}")
  if src.shape != dst.shape:
    raise ValueError(f"dst shape should be src's {src.shape}: but got {dst.shape}")
  scalar = src.ndim == 0
  src, dst = src.reshape(-1).astype(jnp.int32), dst.reshape(-1).astype(jnp.int32)
  check_slots("src", src, cache.max_seqs)
  check_slots("dst", dst, cache.max_seqs)
  if is_concrete(src) and is_concrete(dst):
    both = set(np.asarray(src).tolist()) & set(np.asarray(dst).tolist())
    if both:
      raise ValueError(f"dst should hold no src slot: but {sorted(both)} are in both")
  cache, ok = _fork(cache, src, dst)
  return cache, ok[0] if scalar else ok


def _fork(cache: PagedCache, src, dst) -> tuple[PagedCache, jax.Array]:
  """`fork` without the checks."""
  sq, ps, pps, p = cache.max_seqs, cache.page_size, cache.pages_per_seq, cache.num_pages
  ok = listed(dst, dst.shape[0], sq) & (src >= 0) & (src < sq)
  ok &= ~jnp.any(src[None, :] == dst[:, None], axis=1)  # No dst is any fork's src.
  dst_mask = jnp.zeros((sq,), jnp.bool_).at[jnp.where(ok, dst, sq)].set(True, mode="drop")
  cache = _release(cache, dst_mask)
  src, dst = jnp.where(ok, src, 0), jnp.where(ok, dst, 0)
  length = cache.lengths[src]
  full, partial = length // ps, length % ps != 0
  granted, fresh = _take_free(cache.refs, jnp.where(ok & partial, 1, 0), 1)
  ok &= granted
  copy = jnp.where(ok & partial, fresh[:, 0], NO_PAGE)
  column = lax.broadcasted_iota(jnp.int32, (src.shape[0], pps), 1)
  rows = cache.page_table[src]
  shared = ok[:, None] & (column < full[:, None])
  rows = jnp.where(shared, rows, NO_PAGE)
  rows = jnp.where(column == full[:, None], copy[:, None], rows)
  refs = cache.refs.at[_or_drop(cache.page_table[src], shared, p)].add(1, mode="drop")
  refs = refs.at[_or_drop(copy, ok, p)].add(1, mode="drop")
  # The partial page's tokens, copied into the fresh page: PS tokens per fork.
  last = cache.page_table[src, jnp.minimum(full, pps - 1)]
  into = _or_drop(copy, ok, p)
  # Every layer's, in a stack of layers (page leaves [L, NP, ...]).
  lead = (slice(None),) * (cache.k_pages.ndim - 4)
  copies = {
      name: getattr(cache, name).at[lead + (into,)].set(
          getattr(cache, name)[lead + (jnp.maximum(last, 0),)],
          mode="drop") for name in PAGE_LEAVES if getattr(cache, name) is not None
  }
  target = jnp.where(ok, dst, sq)
  return cache._replace(
      page_table=cache.page_table.at[target].set(rows, mode="drop"),
      lengths=cache.lengths.at[target].set(length, mode="drop"),
      exhausted=cache.exhausted.at[target].set(cache.exhausted[src], mode="drop"),
      refs=refs,
      **copies,
  ), ok
