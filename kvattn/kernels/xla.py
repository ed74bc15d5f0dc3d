"""The portable implementation: blockwise attention in plain XLA, tuned on CPU.

The default on every platform without a kernel of its own, and the fallback
everywhere. Its cost grows with the filled part of the cache, not with its
capacity, and its program size does not grow with the prompt:

  * cached prefix: a loop over blocks of `block_kv` slots whose trip count is
    the traced `ceil(start / block_kv)`; blocks past the index are never read;
  * new chunk: a loop over blocks of `block_q` queries (a static trip count),
    each running a loop over the key blocks up to its own (causal block
    skipping; all of them under prefix-LM);
  * the partial softmaxes are merged (`kvattn.online_softmax`), then
    normalised once.

Memory is O(T * block), never O(T * S): no `[B, N, T, S]` logits exist.

On GPU a loop with a traced trip count costs a host round trip per iteration
(XLA:GPU copies the predicate to the host), which is why GPUs get a kernel of
their own (`kvattn.kernels.pallas_gpu`).

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
  C: keys (or queries) in one block
  R: query rows per kv head in one block, G * T
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import masks
from kvattn import quant
from kvattn.cache import KVCache, leaf, read_slots
from kvattn.kernels import Backend
from kvattn.online_softmax import Partial, accumulate, empty, normalize, probabilities

BLOCK_Q = 128
BLOCK_KV = 128

# Up to this many query rows per kv head (R = G * T, e.g. a decode step), a
# block is read by `_partial_vector`, its values in their stored [B, C, K, H]
# layout; with more, both keys and values go through batched matmuls.
_VECTOR_ROWS = 8

# Partial softmaxes here are over "rows", the (K, G, T) query rows flattened
# in that order: o `[B, K*G*T, H]`, m and l `[B, K*G*T]`. Flat rows keep unit
# axes (G = T = 1 in a decode step) out of the reductions, which XLA:CPU runs
# far more slowly with them.


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, start: jax.Array,
           mask: jax.Array, *, prefix_lm: bool, block_q: int | None = None,
           block_kv: int | None = None, scale: float | None = None, softcap: float | None = None,
           interpret: bool = False) -> tuple[jax.Array, KVCache]:
  """Attention of the new tokens over the cached prefix and themselves.

  The signature of every backend (see `kvattn.kernels`). XLA has no
  interpret mode: its record names no platform to interpret on, so the
  dispatcher never sets `interpret`.
  """
  del interpret
  b, t, n, h = q.shape
  kh = k_new.shape[2]
  g = n // kh
  block_q = min(block_q or BLOCK_Q, t)
  block_kv = min(block_kv or BLOCK_KV, cache.max_len)
  qh = group_queries(q, kh, scale)
  cached, cache = _attend_cache(qh, mask, cache, start, block_kv, softcap)
  new = attend_chunk(qh, k_new, v_new, mask, prefix_lm, block_q, softcap=softcap)
  o = normalize(accumulate(cached, new)).reshape(b, kh, g, t, h)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype), cache


def group_queries(q: jax.Array, num_kv_heads: int, scale: float | None = None) -> jax.Array:
  """Queries `[B, T, N, H]` grouped by kv head: `[B, K, G, T, H]`, float32, pre-scaled.

  Scaled here, once (by `scale`, None for 1/sqrt(H)), so that every caller
  (`attend`, `kvattn.kernels.xla_training`) feeds `attend_chunk` the same numbers.
  """
  b, t, n, h = q.shape
  qh = q.astype(jnp.float32) * (h**-0.5 if scale is None else scale)
  return qh.reshape(b, t, num_kv_heads, n // num_kv_heads, h).transpose(0, 2, 3, 1, 4)


def attend_ring(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache,
                positions: jax.Array, mask: jax.Array, *, block_q: int | None = None,
                block_kv: int | None = None, scale: float | None = None,
                softcap: float | None = None, interpret: bool = False) -> tuple[jax.Array, KVCache]:
  """Attention of the new tokens over a ring cache (read before the write) and themselves.

  Args:
    q: `[B, T, N, H]` queries; k_new, v_new `[B, T, K, H]` as stored.
    cache: the ring cache as it was before this call's write.
    positions: int32 `[B, T]` the new tokens' positions.
    mask: bool `[B, T]`.
    block_q, block_kv, scale, softcap: as in `attend`.
    interpret: unused, as in `attend`.

  Returns:
    `(o, cache)`: o `[B, T, N, H]` in q's dtype, each real query seeing the
    real tokens of its row at positions p - W + 1 .. p (those the ring holds
    and the new ones); the cache, unchanged, threaded through the reads.
  """
  del interpret
  b, t, n, h = q.shape
  kh = k_new.shape[2]
  qh = group_queries(q, kh, scale)
  cached, cache = _attend_ring_slots(qh, mask, positions, cache,
                                     min(block_kv or BLOCK_KV, cache.max_len), softcap)
  new = attend_chunk(qh, k_new, v_new, mask, False, min(block_q or BLOCK_Q, t), positions,
                     leaf(cache, "window"), softcap=softcap)
  o = normalize(accumulate(cached, new)).reshape(b, kh, n // kh, t, h)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype), cache


def _attend_ring_slots(qh, q_mask, q_positions, cache: KVCache, block,
                       softcap) -> tuple[Partial, KVCache]:
  """Partial softmax of the queries over every slot of a ring, block by block.

  A slot is seen when it holds a real token of the row (`valid`) within the
  query's window; every token it can hold is older than the new queries.
  """
  s = cache.max_len
  window = leaf(cache, "window")
  names = ("k", "v", "valid", "positions") + (("k_scale", "v_scale") if cache.quantized else ())

  def body(j, carry):
    acc, bufs = carry
    bufs = barrier(bufs)
    first = j * block
    start = jnp.minimum(first, s - block)  # The last block may overlap the one before.
    take = lambda name: read_slots(bufs[name], start, block, cache.layer)
    slot = start + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    valid = take("valid") & (slot >= first)
    allowed = (masks.padding_mask(q_mask, valid) &
               masks.window_mask(q_positions, take("positions"), window))
    scales = (take("k_scale"), take("v_scale")) if cache.quantized else None
    return accumulate(acc, block_partial(qh, take("k"), take("v"), allowed, scales, softcap)), bufs

  b, kh, g, t, h = qh.shape
  init = varying_like(empty((b, kh * g * t), h), (qh, q_mask, q_positions, cache))
  # Until the ring wraps, slots from the longest row's length on are empty:
  # read ceil(min(max(lengths), S) / C) blocks, a traced trip count.
  filled = jnp.minimum(jnp.max(leaf(cache, "lengths")), s)
  bufs = {name: getattr(cache, name) for name in names}
  acc, bufs = lax.fori_loop(0, (filled + block - 1) // block, body, (init, bufs))
  return acc, cache._replace(**bufs)


def barrier(bufs: dict) -> dict:
  """Cache buffers as a block loop reads them: behind an optimisation barrier.

  The barrier makes the loop really carry them (XLA takes unchanged values
  out of a loop), so that a later write into the loop's results is ordered
  after every read of the loop: a ring is written after its read, and the
  next layer writes the stack a layer has read. Without that order XLA
  copies the buffer to write it (a ring, or in unrolled layers the stack's
  `valid` once per layer). And a bfloat16 buffer read as a loop invariant
  is converted whole to float32 before the loop by XLA:CPU; carried, it is
  read block by block in place.
  """
  return {name: lax.optimization_barrier(x) for name, x in bufs.items()}


def _attend_cache(qh, q_mask, cache: KVCache, end, block, softcap) -> tuple[Partial, KVCache]:
  """Partial softmax of the queries over the cached slots [0, end), block by block.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    q_mask: bool `[B, T]`, True for real queries.
    cache: the `KVCache` to read (slots from `end` on are ignored).
    end: int32 scalar, the number of slots to read, usually traced.
    block: C, slots per block (at most S).
    softcap: None, or the logits' soft cap (`online_softmax.probabilities`).

  Returns:
    The partial over ceil(end / C) blocks, and the cache, threaded through
    the loop.
  """
  s = cache.max_len
  names = ("k", "v", "valid") + (("k_scale", "v_scale") if cache.quantized else ())

  # When C does not divide S, the last block starts at S - C and overlaps the
  # one before; slots below its nominal start were counted there and are
  # masked here.
  def body(j, carry):
    acc, bufs = carry
    bufs = barrier(bufs)
    first = j * block
    start = jnp.minimum(first, s - block)
    # The view's layer of a stack is read in place, block by block.
    take = lambda x: read_slots(x, start, block, cache.layer)
    scales = (take(bufs["k_scale"]), take(bufs["v_scale"])) if cache.quantized else None
    slot = start + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    valid = take(bufs["valid"]) & (slot >= first) & (slot < end)  # [B, C]
    part = block_partial(qh, take(bufs["k"]), take(bufs["v"]), masks.padding_mask(q_mask, valid),
                         scales, softcap)
    return accumulate(acc, part), bufs

  b, kh, g, t, h = qh.shape
  init = varying_like(empty((b, kh * g * t), h), (qh, q_mask, cache, end))
  bufs = {name: getattr(cache, name) for name in names}
  acc, bufs = lax.fori_loop(0, (end + block - 1) // block, body, (init, bufs))
  return acc, cache._replace(**bufs)


def attend_chunk(qh, k, v, mask, prefix_lm: bool, block: int, positions=None, window=None, *,
                 softcap: float | None = None) -> Partial:
  """Partial softmax of the queries over the new keys, query block by query block.

  A loop with a static trip count runs over the blocks of `block` queries; a
  causal query block i reads the key blocks 0..i only (the blocks above the
  diagonal are skipped), a prefix-LM one reads them all. T is padded up to a
  multiple of the block with masked tokens.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    k, v: `[B, T, K, H]` new keys and values, as cached.
    mask: bool `[B, T]`.
    prefix_lm: a Python bool.
    block: C, queries (and keys) per block, at most T.
    positions: with `window`, int32 `[B, T]` token positions (real tokens
      counted only, nondecreasing along T).
    window: None, or W (may be traced): a query at position p also sees only
      keys at positions above p - W (a ring cache's sliding window). Query
      block i then starts at the first key block any of its rows can see.
    softcap: None, or the logits' soft cap (`online_softmax.probabilities`).

  Returns:
    The partial of all T queries: o `[B, K*G*T, H]`, m, l `[B, K*G*T]`.
  """
  b, kh, g, t, h = qh.shape
  num_blocks = -(-t // block)
  causal = None if prefix_lm else masks.causal_mask(t, t)
  if num_blocks == 1:  # A decode step, or a short chunk: no loop.
    local = None if window is None else masks.window_mask(positions, positions, window)
    return block_partial(qh, k, v, masks.combine_masks(masks.padding_mask(mask, mask), causal,
                                                       local), softcap=softcap)
  padded = num_blocks * block
  pad = lambda x, axis: jnp.pad(x, [(0, padded - t if a == axis else 0) for a in range(x.ndim)])
  qh, k, v, mask = pad(qh, 3), pad(k, 1), pad(v, 1), pad(mask, 1)
  if window is not None:  # Padded columns: past every real position, masked anyway.
    positions = jnp.pad(positions, [(0, 0), (0, padded - t)], mode="edge")
  vector = g * block <= _VECTOR_ROWS
  if not vector:  # Head-major float32 keys and values, transposed once for all blocks.
    k, v = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k, v))
  key_axis = 1 if vector else 2

  def query_block(i):
    qb = lax.dynamic_slice_in_dim(qh, i * block, block, axis=3)
    qm = lax.dynamic_slice_in_dim(mask, i * block, block, axis=1)
    qpos = None if window is None else lax.dynamic_slice_in_dim(positions, i * block, block, 1)

    def key_block(j, acc):
      take = lambda x, axis: lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)
      allowed = masks.padding_mask(qm, take(mask, 1))
      if not prefix_lm:
        allowed = masks.combine_masks(allowed, masks.causal_mask(block, block, (i - j) * block))
      if window is not None:
        allowed = allowed & masks.window_mask(qpos, take(positions, 1), window)
      if vector:
        part = _partial_vector(qb, take(k, key_axis), take(v, key_axis), allowed, None, softcap)
      else:
        part = _partial_matmul(qb, take(k, key_axis), take(v, key_axis), allowed, softcap)
      return accumulate(acc, part)

    init = varying_like(empty((b, kh * g * block), h), (qh, mask, k, v, i))
    first = 0 if window is None else _first_key_block(positions, qpos, qm, window, block)
    return lax.fori_loop(first, num_blocks if prefix_lm else i + 1, key_block, init)

  parts = lax.map(query_block, jnp.arange(num_blocks, dtype=jnp.int32))

  def unblock(x):  # [num_blocks, B, K*G*C, ...] -> [B, K*G*T, ...]
    tail = x.shape[3:]
    x = x.reshape(num_blocks, b, kh, g, block, *tail)
    x = jnp.moveaxis(x, 0, 3).reshape(b, kh, g, padded, *tail)[:, :, :, :t]
    return x.reshape(b, kh * g * t, *tail)

  return Partial(*(unblock(x) for x in parts))


def _first_key_block(positions, qpos, q_mask, window, block):
  """The first key block that a real query of this block may see under the window.

  Keys at positions <= min(query position) - W are out of every query's
  window; positions never decrease along T, so they fill whole leading
  columns of each row. Blocks made only of them, in every row, are skipped.
  """
  big = jnp.iinfo(jnp.int32).max // 2
  lowest = jnp.min(jnp.where(q_mask, qpos, big), axis=1)  # [B]; rows without a query: big.
  unseen = jnp.sum(positions <= (lowest - window)[:, None], axis=1)  # [B] leading columns.
  return (jnp.min(unseen) // block).astype(jnp.int32)


def block_partial(qh, k, v, mask, scales=None, softcap=None) -> Partial:
  """Unnormalised attention over one block of keys, with its softmax statistics.

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    k, v: `[B, C, K, H]` keys and values: any float dtype, or int8 with scales.
    mask: bool `[B, T, C]`.
    scales: None, or `(k_scale, v_scale)`, float32 `[B, C, K]` of int8 k and v.
    softcap: None, or the logits' soft cap (`online_softmax.probabilities`).

  Returns:
    o `[B, K*G*T, H]`, m, l `[B, K*G*T]`.
  """
  _, _, g, t, _ = qh.shape
  if t * g <= _VECTOR_ROWS:
    return _partial_vector(qh, k, v, mask, scales, softcap)
  if scales is not None:
    k, v = quant.dequantize(k, scales[0]), quant.dequantize(v, scales[1])
  head_major = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  return _partial_matmul(qh, head_major(k), head_major(v), mask, softcap)


def _partial_matmul(qh, kt, vt, mask, softcap) -> Partial:
  """`block_partial` for many query rows: batched matmuls over (B, K).

  Args:
    qh: `[B, K, G, T, H]` float32 scaled queries.
    kt, vt: `[B, K, C, H]` float32 keys and values, head-major.
    mask: bool `[B, T, C]`.
  """
  b, kh, g, t, h = qh.shape
  c = kt.shape[2]
  logits = jnp.einsum("BKGTH,BKCH->BKGTC", qh, kt)
  p, m = probabilities(logits, jnp.broadcast_to(mask[:, None, None], (b, kh, g, t, c)), -1, softcap)
  vt = jnp.where(_key_ok(mask)[:, None, :, None], vt, 0.0)  # Padding stays inert.
  o = jnp.einsum("BKGTC,BKCH->BKGTH", p, vt)
  return Partial(o.reshape(b, -1, h), m.reshape(b, -1), jnp.sum(p, axis=-1).reshape(b, -1))


def _partial_vector(qh, k, v, mask, scales, softcap) -> Partial:
  """`block_partial` for a few query rows (a decode step): R = G * T rows per kv head.

  Logits are `[B, C, K*R]`; the values are read as stored, by a multiply and
  a sum over C (a non-minor axis, which XLA:CPU reduces fast). An int8 block
  is scaled after the products: the logits by k_scale, the probabilities by
  v_scale.
  """
  b, kh, g, t, h = qh.shape
  c, r = k.shape[1], g * t
  k = k.astype(jnp.float32)
  v = jnp.where(_key_ok(mask)[:, :, None, None], v.astype(jnp.float32), 0.0)  # Padding stays inert.
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
  p, m = probabilities(logits, mask, 1, softcap)  # p [B, C, K*R]
  pv = p if scales is None else jnp.where(mask, p * _per_row(scales[1], r), 0.0)
  # The products keep no unit axis (K = 1 or R = 1), which XLA:CPU reduces slowly.
  if kh == 1:
    o = jnp.sum(pv[..., None] * v[:, :, 0, None], axis=1)  # [B, R, H]
  elif r == 1:
    o = jnp.sum(pv[..., None] * v, axis=1)  # [B, K, H]
  else:
    o = jnp.sum(pv.reshape(b, c, kh, r)[..., None] * v[:, :, :, None], axis=1)
  return Partial(o.reshape(b, kh * r, h), m, jnp.sum(p, axis=1))


def _key_ok(mask):
  """bool `[B, C]`: keys some query may attend to.

  Values (and value scales) elsewhere are zeroed before they are multiplied:
  a probability of 0 times a NaN or inf at padding, or in a slot never
  written, would still be NaN.
  """
  return jnp.any(mask, axis=1)


def _per_row(scale, r):
  """A block's `[B, C, K]` scales repeated for the R rows of each kv head: `[B, C, K*R]`."""
  b, c, kh = scale.shape
  return jnp.broadcast_to(scale[..., None], (b, c, kh, r)).reshape(b, c, kh * r)


def varying_like(tree, sources):
  """Marks `tree` as varying over the manual mesh axes `sources` vary over.

  Inside `shard_map` a loop's carry must have the same varying axes on entry
  as the body gives it; constants have none. Outside `shard_map` this is a
  no-op.
  """
  axes = frozenset().union(*(_varying(x) for x in jax.tree.leaves(sources)))

  def cast(x):
    missing = tuple(sorted(axes - _varying(x)))
    if not missing:
      return x
    if hasattr(lax, "pcast"):  # jax >= 0.8.2.
      return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)

  return jax.tree.map(cast, tree)


def _varying(x) -> frozenset:
  """The manual mesh axes x varies over (`.manual_axis_type.varying`; `.vma` before)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return frozenset(axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


BACKEND = Backend("xla", attend, attend_ring)  # Compiles on every platform.
