"""Attention of new tokens over a key/value cache, and the cache write.

This is the kernel level: callers bring their own projected queries, keys and
values. `kvattn.prefill` and `kvattn.decode_step` are projections around it.

The work is blockwise with an online (log-sum-exp) softmax, so its cost grows
with the filled part of the cache, not with its capacity:

  * cached prefix: a loop over blocks of `block_kv` slots whose trip count is
    the traced `ceil(index / block_kv)`; blocks past the index are never read;
  * new chunk: queries in blocks of `block_q`, each against the new keys up to
    its own last position (causal block skipping);
  * the two partial softmaxes are merged, then normalised once.

Memory is O(T * block), never O(T * S): no `[B, N, T, S]` logits exist.

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
  C: slots in one block of the cache (block_kv, or S when smaller)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn import masks
from kvattn import quant
from kvattn._checks import check_cache, check_mask, check_positive_ints, check_shape
from kvattn.cache import KVCache

# Masked logits get a large finite negative (not -inf), so exp() of a fully
# masked row is 0 rather than NaN; the row's normaliser then reads 0.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

BLOCK_Q = 128
BLOCK_KV = 128

# Up to this many query rows per kv head (T * G, e.g. a decode step), a block
# is read by `_partial_vector`, its values in their stored [B, C, K, H]
# layout; with more, both keys and values go through batched matmuls.
_VECTOR_ROWS = 8


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    mask: jax.Array | None = None,
    *,
    prefix_lm: bool | jax.Array = False,
    block_q: int = BLOCK_Q,
    block_kv: int = BLOCK_KV,
) -> tuple[jax.Array, KVCache]:
  """Attends T new tokens over the cache and themselves, then caches them.

  Each new query sees every valid cached slot, and the new keys causally
  (bidirectionally with `prefix_lm`), skipping padding. Queries that are
  padding see nothing and give zeros. Logits and softmax are float32 whatever
  the storage dtype; scale is 1/sqrt(H). Query head n uses kv head n // G.

  The new keys and values are first cast to the cache's dtype (quantised and
  dequantised for an int8 cache), so attending to them now gives the same
  numbers as attending to them from the cache later.

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
    block_q: queries per block of the new chunk.
    block_kv: cache slots per block of the cached prefix. Neither block size
      changes the result beyond float32 rounding.

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
  check_positive_ints(block_q=block_q, block_kv=block_kv)
  if mask is None:
    mask = jnp.ones((b, t), jnp.bool_)
  check_mask(mask, b, t)

  if cache.quantized:
    (kq, k_scale), (vq, v_scale) = quant.quantize(k), quant.quantize(v)
    k, v = quant.dequantize(kq, k_scale), quant.dequantize(vq, v_scale)
    stored = dict(k=kq, v=vq, k_scale=k_scale, v_scale=v_scale)
  else:
    k = k.astype(cache.k.dtype)
    v = v.astype(cache.v.dtype)
    stored = dict(k=k, v=v)

  # Queries grouped by kv head: [B, K, G, T, H], float32, pre-scaled.
  qh = q.astype(jnp.float32) * (h ** -0.5)
  qh = qh.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  # Write first, then read the prefix [0, index) from the written buffers:
  # the reads then come after the in-place update, and XLA needs no copy of
  # the cache to keep the old one alive (with a donated cache, none is made).
  new_cache = _write(cache, mask, **stored)
  cached = _attend_cache(qh, mask, new_cache, cache.index, min(block_kv, s))
  new = _attend_chunk(qh, k, v, mask, prefix_lm, min(block_q, t))
  o = _merge(cached, new).reshape(b, kh, n // kh, t, h)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return o.astype(q.dtype), new_cache


# Partial softmaxes below are triples (o, m, l) over "rows", the (K, G, T)
# query rows flattened in that order: o `[B, K*G*T, H]` (sum of p * v), row
# max m and row sum l `[B, K*G*T]`. Flat rows keep unit axes (G = T = 1 in a
# decode step) out of the reductions, which XLA:CPU runs far more slowly with
# them.


def _attend_cache(qh, q_mask, cache, end, block):
  """Partial softmax of the queries over the cached slots [0, end), block by block.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    q_mask: bool `[B, T]`, True for real queries.
    cache: the `KVCache` to read (slots from `end` on are ignored).
    end: int32 scalar, the number of slots to read, usually traced.
    block: C, slots per block (at most S).

  Returns:
    `(o, m, l)` over ceil(end / C) blocks: o `[B, K*G*T, H]`, m, l `[B, K*G*T]`.
  """
  s = cache.max_len
  # When C does not divide S, the last block starts at S - C and overlaps the
  # one before; slots below its nominal start were counted there and are
  # masked here.
  def body(j, carry):
    first = j * block
    start = jnp.minimum(first, s - block)
    # Per-axis slices keep every other axis intact, so a cache sharded over
    # B or K stays sharded (slicing a flattened [B, S * K * H] view would not).
    take = lambda x: lax.dynamic_slice_in_dim(x, start, block, axis=1)
    scales = None
    if cache.quantized:
      scales = take(cache.k_scale), take(cache.v_scale)
    slot = start + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    valid = take(cache.valid) & (slot >= first) & (slot < end)  # [B, C]
    part = _partial(qh, take(cache.k), take(cache.v), masks.padding_mask(q_mask, valid), scales)
    return _accumulate(carry, part)

  b, kh, g, t, h = qh.shape
  rows = kh * g * t
  init = (jnp.zeros((b, rows, h), jnp.float32),
          jnp.full((b, rows), _MASKED, jnp.float32),
          jnp.zeros((b, rows), jnp.float32))
  init = _varying_like(init, (qh, q_mask, cache, end))
  num_blocks = (end + block - 1) // block
  return lax.fori_loop(0, num_blocks, body, init)


def _varying_like(tree, sources):
  """Marks `tree` as varying over the manual mesh axes `sources` vary over.

  Inside `shard_map` a loop's carry must have the same varying axes on entry
  as the body gives it; constants have none. Outside `shard_map` this is a
  no-op.
  """
  axes = frozenset().union(*(_varying(x) for x in jax.tree.leaves(sources)))
  def cast(x):
    missing = tuple(sorted(axes - _varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def _varying(x) -> frozenset:
  """The manual mesh axes x varies over (`.manual_axis_type.varying`; `.vma` before)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return frozenset(axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def _attend_chunk(qh, k, v, mask, prefix_lm, block):
  """Partial softmax of the queries over the new keys, query block by query block.

  A causal query block [lo, hi) needs keys [0, hi) only: the blocks above the
  diagonal are skipped. With `prefix_lm` every query block reads every key. A
  traced `prefix_lm` picks between the two with `lax.cond` (when there are
  several query blocks), so a causal call skips blocks either way.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    k, v: `[B, T, K, H]` new keys and values, as cached.
    mask: bool `[B, T]`.
    prefix_lm: a Python bool or a traced bool scalar.
    block: queries per block (at most T).

  Returns:
    `(o, m, l)` for all T queries: o `[B, K*G*T, H]`, m, l `[B, K*G*T]`.
  """
  if isinstance(prefix_lm, (bool, np.bool_)):
    return _chunk_blocks(qh, k, v, mask, bool(prefix_lm), block)
  flag = jnp.asarray(prefix_lm, jnp.bool_)
  if qh.shape[3] <= block:  # One block: masking by the flag costs nothing extra.
    return _chunk_blocks(qh, k, v, mask, flag, block)
  return lax.cond(flag, lambda: _chunk_blocks(qh, k, v, mask, True, block),
                  lambda: _chunk_blocks(qh, k, v, mask, False, block))


def _chunk_blocks(qh, k, v, mask, bidirectional, block):
  """`_attend_chunk` for a Python bool `bidirectional`, or a traced one (no skipping)."""
  b, kh, g, t, h = qh.shape
  # Head-major keys and values for the matmuls, transposed once for all blocks.
  kt, vt = k.astype(jnp.float32).transpose(0, 2, 1, 3), v.astype(jnp.float32).transpose(0, 2, 1, 3)
  parts = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    keys = hi if bidirectional is False else t
    within = None
    if bidirectional is not True:
      within = masks.causal_mask(hi - lo, keys, offset=lo)
      if bidirectional is not False:  # Traced.
        within = within | bidirectional
    part_mask = masks.combine_masks(masks.padding_mask(mask[:, lo:hi], mask[:, :keys]), within)
    if (hi - lo) * g <= _VECTOR_ROWS:
      o, m, l = _partial_vector(qh[:, :, :, lo:hi], k[:, :keys], v[:, :keys], part_mask, None)
    else:
      o, m, l = _partial_matmul(qh[:, :, :, lo:hi], kt[:, :, :keys], vt[:, :, :keys], part_mask)
    parts.append((o.reshape(b, kh, g, hi - lo, h), m.reshape(b, kh, g, hi - lo),
                  l.reshape(b, kh, g, hi - lo)))
  o, m, l = (jnp.concatenate(xs, axis=3) for xs in zip(*parts))
  return o.reshape(b, kh * g * t, h), m.reshape(b, -1), l.reshape(b, -1)


def _partial(qh, k, v, mask, scales=None):
  """Unnormalised attention over one block of keys, with its softmax statistics.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    k, v: `[B, C, K, H]` keys and values: any float dtype, or int8 with scales.
    mask: bool `[B, T, C]`.
    scales: None, or `(k_scale, v_scale)`, float32 `[B, C, K]` of int8 k and v.

  Returns:
    `(o, m, l)`: o `[B, K*G*T, H]`, m, l `[B, K*G*T]`.
  """
  _, _, g, t, _ = qh.shape
  if t * g <= _VECTOR_ROWS:
    return _partial_vector(qh, k, v, mask, scales)
  if scales is not None:
    k, v = quant.dequantize(k, scales[0]), quant.dequantize(v, scales[1])
  head_major = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  return _partial_matmul(qh, head_major(k), head_major(v), mask)


def _partial_matmul(qh, kt, vt, mask):
  """`_partial` for many query rows: batched matmuls over (B, K).

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    kt, vt: `[B, K, C, H]` float32 keys and values, head-major.
    mask: bool `[B, T, C]`.
  """
  b, kh, g, t, h = qh.shape
  c = kt.shape[2]
  logits = jnp.einsum("BKGTH,BKCH->BKGTC", qh, kt)
  mask = jnp.broadcast_to(mask[:, None, None], (b, kh, g, t, c))
  logits = jnp.where(mask, logits, _MASKED)
  m = jnp.max(logits, axis=-1)
  p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  o = jnp.einsum("BKGTC,BKCH->BKGTH", p, vt)
  return o.reshape(b, -1, h), m.reshape(b, -1), jnp.sum(p, axis=-1).reshape(b, -1)


def _partial_vector(qh, k, v, mask, scales):
  """`_partial` for a few query rows (a decode step): R = G * T rows per kv head.

  Logits are `[B, C, K*R]`; the values are read as stored, by a multiply and
  a sum over C (a non-minor axis, which XLA:CPU reduces fast). An int8 block
  is scaled after the products: the logits by k_scale, the probabilities by
  v_scale.
  """
  b, kh, g, t, h = qh.shape
  c, r = k.shape[1], g * t
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  qr = qh.reshape(b, kh, r, h)
  # Logits by matmul: XLA:CPU reduces over H (the minor axis) several times
  # more slowly. With one kv head the block is read as stored; with several,
  # transposed to [B, K, C, H] by the copy that takes it out of the cache, so
  # K stays a batch axis (a cache sharded over K stays sharded).
  if kh == 1:
    logits = jnp.einsum("BCH,BRH->BCR", k[:, :, 0], qr[:, 0])
  elif r == 1:
    logits = jnp.einsum("BKCH,BKH->BKC", k.transpose(0, 2, 1, 3), qr[:, :, 0])
    logits = logits.transpose(0, 2, 1)
  else:
    logits = jnp.einsum("BKCH,BKRH->BCKR", k.transpose(0, 2, 1, 3), qr).reshape(b, c, kh * r)
  if scales is not None:
    logits = logits * _per_row(scales[0], r)
  mask = mask.transpose(0, 2, 1)[:, :, None, None]  # [B, C, 1, 1, T]
  mask = jnp.broadcast_to(mask, (b, c, kh, g, t)).reshape(b, c, kh * r)
  logits = jnp.where(mask, logits, _MASKED)
  m = jnp.max(logits, axis=1)
  p = jnp.where(mask, jnp.exp(logits - m[:, None]), 0.0)  # [B, C, K*R]
  pv = p if scales is None else p * _per_row(scales[1], r)
  # The products keep no unit axis (K = 1 or R = 1), which XLA:CPU reduces slowly.
  if kh == 1:
    o = jnp.sum(pv[..., None] * v[:, :, 0, None], axis=1)  # [B, R, H]
  elif r == 1:
    o = jnp.sum(pv[..., None] * v, axis=1)  # [B, K, H]
  else:
    o = jnp.sum(pv.reshape(b, c, kh, r)[..., None] * v[:, :, :, None], axis=1)
  return o.reshape(b, kh * r, h), m, jnp.sum(p, axis=1)


def _per_row(scale, r):
  """A block's `[B, C, K]` scales repeated for the R rows of each kv head: `[B, C, K*R]`."""
  b, c, kh = scale.shape
  return jnp.broadcast_to(scale[..., None], (b, c, kh, r)).reshape(b, c, kh * r)


def _accumulate(a, b):
  """Combines two partial softmaxes into one, still unnormalised."""
  (oa, ma, la), (ob, mb, lb) = a, b
  m = jnp.maximum(ma, mb)
  sa, sb = jnp.exp(ma - m), jnp.exp(mb - m)
  return oa * sa[..., None] + ob * sb[..., None], m, la * sa + lb * sb


def _merge(a, b):
  """Combines two partial softmaxes into the normalised output."""
  o, _, l = _accumulate(a, b)
  # A query that sees nothing has l == 0 and o == 0: it yields zeros.
  return o / jnp.where(l == 0.0, 1.0, l)[..., None]


def _write(cache: KVCache, mask, **new) -> KVCache:
  """Writes T tokens at cache.index, or nothing at all if they do not fit.

  Args:
    cache: the cache to append to.
    mask: bool `[B, T]`, the new tokens' validity.
    **new: the arrays to store, by field name: k and v `[B, T, K, H]`, and
      for an int8 cache k_scale and v_scale `[B, T, K]`.

  XLA's dynamic_update_slice clamps an out-of-range start, which would
  silently overwrite the newest entries. So the start is clamped here
  explicitly and, when the write does not fit, the slots already there are
  written back unchanged. The cost is O(T), never O(S).
  """
  t = mask.shape[1]
  s = cache.max_len
  fits = (cache.index <= s - t) & ~cache.overflow
  start = jnp.clip(cache.index, 0, s - t)

  def put(buf, x):
    old = lax.dynamic_slice_in_dim(buf, start, t, axis=1)
    keep = fits.reshape((1,) * x.ndim)
    return lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, x, old), start, axis=1)

  written = jnp.sum(mask, axis=1, dtype=jnp.int32)
  return cache._replace(
      **{name: put(getattr(cache, name), x) for name, x in new.items()},
      valid=put(cache.valid, mask),
      lengths=cache.lengths + jnp.where(fits, written, 0),
      index=jnp.where(fits, cache.index + t, cache.index),
      overflow=cache.overflow | ~fits,
  )
