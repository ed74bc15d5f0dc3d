"""Attention of new tokens over a key/value cache, and the cache write.

This is the kernel level: callers bring their own projected queries, keys and
values. `kvattn.prefill` and `kvattn.decode_step` are projections around it.

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import masks
from kvattn._checks import check_cache, check_mask, check_shape
from kvattn.cache import KVCache

# Masked logits get a large finite negative (not -inf), so exp() of a fully
# masked row is 0 rather than NaN; the row's normaliser then reads 0.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    mask: jax.Array | None = None,
    *,
    prefix_lm: bool | jax.Array = False,
) -> tuple[jax.Array, KVCache]:
  """Attends T new tokens over the cache and themselves, then caches them.

  Each new query sees every valid cached slot, and the new keys causally
  (bidirectionally with `prefix_lm`), skipping padding. Queries that are
  padding see nothing and give zeros. Logits and softmax are float32 whatever
  the storage dtype; scale is 1/sqrt(H). Query head n uses kv head n // G.

  The new keys and values are first cast to the cache's dtype, so attending to
  them now gives the same numbers as attending to them from the cache later.

  If the write would pass max_len (or the cache has already overflowed), the
  output is still computed, but nothing is written, the index stays, and the
  sticky `overflow` flag is set: cached entries are never overwritten.

  Args:
    q: `[B, T, N, H]` queries (after RoPE, if used).
    k: `[B, T, K, H]` new keys (after RoPE, if used).
    v: `[B, T, K, H]` new values.
    cache: the `KVCache` to read and append to.
    mask: bool `[B, T]`, True for real tokens, False for padding (left or
      right); None means all real.
    prefix_lm: if True, the T new tokens see each other bidirectionally. A
      Python bool or a traced bool scalar.

  Returns:
    `(o, new_cache)`: o `[B, T, N, H]` in q's dtype, and the updated cache.
  """
  check_cache(cache)
  b, s, kh, h = cache.k.shape
  check_shape("q", q, "(B, T, N, H)", (b, None, None, h))
  _, t, n, _ = q.shape
  check_shape("k", k, "(B, T, K, H)", (b, t, kh, h))
  check_shape("v", v, "(B, T, K, H)", (b, t, kh, h))
  if n % kh:
    raise ValueError(
        f"q heads N={n} should be a multiple of the cache's kv heads K={kh}")
  if t > s:
    raise ValueError(
        f"q has T={t} new tokens, more than the cache's max_len S={s}")
  if mask is None:
    mask = jnp.ones((b, t), jnp.bool_)
  check_mask(mask, b, t)

  k = k.astype(cache.k.dtype)
  v = v.astype(cache.v.dtype)
  o = _attend(q, k, v, mask, cache, prefix_lm)
  return o.astype(q.dtype), _write(cache, k, v, mask)


def _attend(q, k, v, mask, cache, prefix_lm):
  """Softmax attention over [cached slots ; new tokens], merged log-sum-exp style."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h) * (h ** -0.5)

  # Cached part: every valid slot, for every real query.
  cached_mask = masks.padding_mask(mask, cache.valid)  # [B, T, S]
  cached = _partial(qg, cache.k, cache.v, cached_mask)

  # New part: the chunk against itself.
  within = masks.causal_mask(t, t) | jnp.asarray(prefix_lm, jnp.bool_)
  new_mask = masks.combine_masks(masks.padding_mask(mask, mask), within)  # [B, T, T]
  new = _partial(qg, k, v, new_mask)

  o = _merge(cached, new)  # [B, T, K, G, H]
  return o.reshape(b, t, n, h)


def _partial(qg, k, v, mask):
  """Unnormalised attention over one block of keys, with its softmax statistics.

  Args:
    qg: `[B, T, K, G, H]` float32 scaled queries.
    k, v: `[B, S, K, H]` keys and values (any float dtype).
    mask: bool `[B, T, S]`.

  Returns:
    o `[B, T, K, G, H]` (sum of p * v), row max m and row sum l, both
    `[B, T, K, G]`.
  """
  logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k.astype(jnp.float32))
  mask = mask[:, :, None, None, :]
  logits = jnp.where(mask, logits, _MASKED)
  m = jnp.max(logits, axis=-1)
  p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("BTKGS,BSKH->BTKGH", p, v.astype(jnp.float32))
  return o, m, l


def _merge(a, b):
  """Combines two partial softmaxes into the normalised output."""
  (oa, ma, la), (ob, mb, lb) = a, b
  m = jnp.maximum(ma, mb)
  sa, sb = jnp.exp(ma - m), jnp.exp(mb - m)
  l = la * sa + lb * sb
  o = oa * sa[..., None] + ob * sb[..., None]
  # A query that sees nothing has l == 0 and o == 0: it yields zeros.
  return o / jnp.where(l == 0.0, 1.0, l)[..., None]


def _write(cache: KVCache, k, v, mask) -> KVCache:
  """Writes T tokens at cache.index, or nothing at all if they do not fit.

  XLA's dynamic_update_slice clamps an out-of-range start, which would
  silently overwrite the newest entries. So the start is clamped here
  explicitly and, when the write does not fit, the slots already there are
  written back unchanged. The cost is O(T), never O(S).
  """
  t = k.shape[1]
  s = cache.max_len
  fits = (cache.index <= s - t) & ~cache.overflow
  start = jnp.clip(cache.index, 0, s - t)

  def put(buf, new):
    old = lax.dynamic_slice_in_dim(buf, start, t, axis=1)
    keep = fits.reshape((1,) * new.ndim)
    return lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, new, old), start, axis=1)

  written = jnp.sum(mask, axis=1, dtype=jnp.int32)
  return cache._replace(
      k=put(cache.k, k),
      v=put(cache.v, v),
      valid=put(cache.valid, mask),
      lengths=cache.lengths + jnp.where(fits, written, 0),
      index=jnp.where(fits, cache.index + t, cache.index),
      overflow=cache.overflow | ~fits,
  )
