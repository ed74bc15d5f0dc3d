"""The portable paged kernel: ragged attention over pages, in plain XLA.

The default on every platform. Its cost follows the batch's own tokens:
neither the pool (NP) nor the slots' capacity (SQ x PPS x PS) appear in a
trip count or a temporary. The sequences of a batch take one of two paths:

  * decode (1 new token, `DECODE_ROWS`): all such sequences at once, as the
    rows of one batch; a loop over blocks of `block_kv` cached tokens up to
    the longest of them gathers each sequence's pages for the block by its
    page table (`[B, C, K, H]`), the dense cache's decode step with a
    gather in place of a slice;
  * chunk (more new tokens: a prefill chunk, a verification window): one
    sequence at a time, in tiles of `block_q` queries taken from the flat
    batch; each tile reads its sequence's cached pages block by block, then
    the new keys of its sequence up to its own rows (causal).

Both read the cached tokens (those before this call) from the pages and the
new tokens from `k_new`/`v_new`, so a sequence whose write was refused
(exhausted) still gets the output over its cached and new tokens. Partial
softmaxes merge by `kvattn.online_softmax`; the block partials are the dense
XLA kernel's (`kvattn.kernels.xla`), so both caches give the same numbers.

Shape legend:
  TT: tokens in the flat batch
  B: sequences in the batch
  NP: pages; PS: tokens per page; PPS: pages per slot
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
  C: cached tokens in one block (whole pages: max(1, block_kv // PS) of them)
  Q: queries in one tile (block_q, at most TT)
  R: new tokens per sequence on the decode path (DECODE_ROWS)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvattn.kernels import xla as dense
from kvattn.online_softmax import accumulate, empty, normalize
from kvattn.paged.batch import Ragged
from kvattn.paged.cache import PagedCache

BLOCK_Q = 128
BLOCK_KV = 128

# Sequences with at most this many new tokens take the decode path.
DECODE_ROWS = 1


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: PagedCache, batch: Ragged, *,
           block_q: int | None = None, block_kv: int | None = None, scale: float | None = None,
           softcap: float | None = None) -> tuple[jax.Array, PagedCache]:
  """Attention of a ragged batch over its sequences' pages and its own new tokens.

  The signature of every paged backend (see `kvattn.paged.attention`).

  Args:
    q: `[TT, N, H]` queries (after RoPE, if used).
    k_new, v_new: `[TT, K, H]` the new tokens as the pages hold them
      (`kvattn.paged.batch.write` returns them).
    cache: the cache after the write; each sequence reads its slot's first
      `batch.kv_len` tokens from it (from layer `cache.layer` of stacked
      pages, in a layer view).
    batch: the `Ragged` batch.
    block_q: Q, queries per tile of a chunk; None for `BLOCK_Q`.
    block_kv: cached tokens per block, rounded down to whole pages (at least
      one); None for `BLOCK_KV`. Neither block size changes the result beyond
      float32 rounding.
    scale: the logits' scale; None for 1/sqrt(H).
    softcap: None, or the logits' soft cap (`kvattn.online_softmax.probabilities`).

  Returns:
    `(o, cache)`: o `[TT, N, H]` in q's dtype, zeros at padding; the cache,
    threaded through the block loops.
  """
  tt, n, h = q.shape
  pages = max(1, min((block_kv or BLOCK_KV) // cache.page_size, cache.pages_per_seq))
  names = ("k_pages", "v_pages") + (("k_scale", "v_scale") if cache.quantized else ())
  bufs = {name: getattr(cache, name) for name in names}
  o = jnp.zeros((tt, n, h), jnp.float32)
  rows = min(DECODE_ROWS, tt)
  decode = batch.valid & (batch.q_len >= 1) & (batch.q_len <= rows)
  o, bufs = _decode(q, k_new, v_new, o, cache.page_table, bufs, cache.layer, batch, decode, rows,
                    pages, scale, softcap)
  chunk = batch.valid & (batch.q_len > rows)
  o, bufs = _chunks(q, k_new, v_new, o, cache.page_table, bufs, cache.layer, batch, chunk,
                    min(block_q or BLOCK_Q, tt), pages, scale, softcap)
  return o.astype(q.dtype), cache._replace(**bufs)


def _block(bufs: dict, ids: jax.Array, layer) -> tuple[jax.Array, jax.Array, tuple | None]:
  """Keys, values (and int8 scales) of the pages `ids [B, pages]`: `[B, C, K, H]`.

  With a layer (a layer view's), the buffers are stacks `[L, NP, ...]` and
  the pages are gathered from layer `layer` where they are.
  """
  def gather(x):
    x = x[ids] if layer is None else x[layer, ids]
    return x.reshape(ids.shape[0], -1, *x.shape[3:])

  scales = None
  if "k_scale" in bufs:
    scales = (gather(bufs["k_scale"]), gather(bufs["v_scale"]))
  return gather(bufs["k_pages"]), gather(bufs["v_pages"]), scales


def _page_ids(table_rows: jax.Array, j, pages: int, num_pages: int) -> jax.Array:
  """Page ids of block j of each row of `table_rows [B, PPS]`: `[B, pages]`, clipped to [0, NP).

  Columns past PPS (a last block that overhangs) and entries without a page
  read page 0: their tokens are past each sequence's length, masked.
  """
  pps = table_rows.shape[1]
  column = jnp.minimum(j * pages + lax.broadcasted_iota(jnp.int32, (1, pages), 1), pps - 1)
  ids = jnp.take_along_axis(table_rows, jnp.broadcast_to(column, (table_rows.shape[0], pages)),
                            axis=1)
  return jnp.clip(ids, 0, num_pages - 1)


def _cached(qh, q_real, table_rows, kv_len, bufs, layer, pages, page_size, num_pages, softcap):
  """Partial softmax of queries `qh [B, K, G, T, H]` over each row's first `kv_len [B]` tokens.

  A loop over blocks of C = pages * PS tokens, up to the longest row; row b
  reads the pages of its table row `table_rows[b]`.
  """
  b, kh, g, t, h = qh.shape
  c = pages * page_size

  def body(j, carry):
    acc, bufs = carry
    bufs = dense.barrier(bufs)  # Read in place, block by block (see the dense kernel).
    k, v, scales = _block(bufs, _page_ids(table_rows, j, pages, num_pages), layer)
    seen = (j * c + lax.broadcasted_iota(jnp.int32, (1, c), 1)) < kv_len[:, None]  # [B, C]
    mask = q_real[:, :, None] & seen[:, None, :]
    return accumulate(acc, dense.block_partial(qh, k, v, mask, scales, softcap)), bufs

  init = dense.varying_like(empty((b, kh * g * t), h), (qh, q_real, table_rows, kv_len, bufs))
  trips = (jnp.max(kv_len) + c - 1) // c
  return lax.fori_loop(0, trips, body, (init, bufs))


def _decode(q, k_new, v_new, o, table, bufs, layer, batch: Ragged, take, rows: int, pages: int,
            scale, softcap):
  """The decode path: every sequence with 1 .. R new tokens, as one batch of B rows."""
  tt, n, h = q.shape
  b, kh = batch.slot.shape[0], k_new.shape[1]
  g = n // kh
  column = lax.broadcasted_iota(jnp.int32, (b, rows), 1)
  real = take[:, None] & (column < batch.q_len[:, None])  # [B, R]
  index = jnp.clip(batch.start[:, None] + column, 0, tt - 1)
  qh = dense.group_queries(q[index], kh, scale)  # [B, K, G, R, H]
  causal = lax.broadcasted_iota(jnp.int32, (rows, rows),
                                1) <= lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
  new = dense.block_partial(qh, k_new[index], v_new[index],
                            real[:, :, None] & real[:, None, :] & causal[None], None, softcap)
  acc, bufs = _cached(qh, real, table[batch.slot], jnp.where(take, batch.kv_len, 0), bufs, layer,
                      pages, bufs["k_pages"].shape[-3], bufs["k_pages"].shape[-4], softcap)
  out = normalize(accumulate(acc, new)).reshape(b, kh, g, rows, h)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, rows, n, h)
  return o.at[jnp.where(real, index, tt)].set(out, mode="drop"), bufs


def _chunks(q, k_new, v_new, o, table, bufs, layer, batch: Ragged, take, block: int, pages: int,
            scale, softcap):
  """The chunk path: each sequence with more new tokens, one after another, in tiles of Q."""
  tt, n, h = q.shape
  kh = k_new.shape[1]
  g = n // kh
  b = batch.slot.shape[0]
  page_size, num_pages = bufs["k_pages"].shape[-3], bufs["k_pages"].shape[-4]
  order = jnp.nonzero(take, size=b, fill_value=0)[0]
  iota = lax.broadcasted_iota(jnp.int32, (block,), 0)

  def sequence(s, carry):
    i = order[s]
    start, q_len = batch.start[i], batch.q_len[i]
    table_row = lax.dynamic_index_in_dim(table, batch.slot[i], 0)  # [1, PPS]

    def tile(t, carry):
      o, bufs = carry
      first = start + t * block
      at = jnp.minimum(first, tt - block)  # The last tile may overlap the one before.
      rows = at + iota
      real = (rows >= first) & (rows < start + q_len)
      qh = dense.group_queries(lax.dynamic_slice_in_dim(q, at, block, axis=0)[None], kh, scale)
      acc, bufs = _cached(qh, real[None], table_row, batch.kv_len[i][None], bufs, layer, pages,
                          page_size, num_pages, softcap)

      def new_keys(u, acc):
        key_first = start + u * block
        key_at = jnp.minimum(key_first, tt - block)
        keys = key_at + iota
        seen = (keys >= key_first) & (keys < start + q_len)
        mask = real[:, None] & seen[None, :] & (keys[None, :] <= rows[:, None])
        take_keys = lambda x: lax.dynamic_slice_in_dim(x, key_at, block, axis=0)[None]
        part = dense.block_partial(qh, take_keys(k_new), take_keys(v_new), mask[None], None,
                                   softcap)
        return accumulate(acc, part)

      acc = lax.fori_loop(0, t + 1, new_keys, acc)
      out = normalize(acc).reshape(kh, g, block, h).transpose(2, 0, 1, 3).reshape(block, n, h)
      old = lax.dynamic_slice_in_dim(o, at, block, axis=0)
      out = jnp.where(real[:, None, None], out, old)
      return lax.dynamic_update_slice_in_dim(o, out, at, axis=0), bufs

    return lax.fori_loop(0, (q_len + block - 1) // block, tile, carry)

  return lax.fori_loop(0, jnp.sum(take, dtype=jnp.int32), sequence, (o, bufs))
