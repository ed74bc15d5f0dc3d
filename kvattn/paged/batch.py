"""A ragged batch: the new tokens of several sequences in one flat array, and their write.

The metadata follows the ragged paged attention kernels (jax's TPU
`ragged_paged_attention`, vLLM-TPU's RPA v3): sequence i of the batch is
cache slot `seq_slots[i]`, and its new tokens are rows
`cu_q_lens[i] .. cu_q_lens[i + 1]` of the flat batch; rows from
`cu_q_lens[num_seqs]` on are padding.

`check_batch` refuses metadata that does not describe a batch, when it is
concrete. Under `jit` it cannot be refused, so `ragged` turns any metadata
into a batch that touches only what its sequences own: an entry past
`num_seqs`, naming a slot out of range or one named before, is ignored (its
rows are padding); `cu_q_lens` is clipped to [0, TT] and made
non-decreasing. `write` then writes a token only into a page of its own
slot's table that no other slot shares.

Shape legend:
  TT: tokens in the flat batch (new tokens of every sequence, then padding)
  B: sequences in the batch (entries of seq_slots)
  SQ: sequence slots of the cache
  NP: pages; PS: tokens per page; PPS: pages per slot
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn import quant
from kvattn._checks import check_shape, is_concrete
from kvattn.paged.cache import PagedCache, check_count, check_slots, listed


class Ragged(NamedTuple):
  """A ragged batch as the kernels read it: every index in range, whatever the metadata.

  Per sequence of the batch (`[B]`):
    slot: int32, its cache slot (0 for an ignored entry).
    start: int32, its first row in the flat batch.
    q_len: int32, its new tokens (0 for an ignored entry).
    kv_len: int32, its tokens cached before this call (0 for an ignored entry).
    valid: bool, the entry is a sequence of the batch.
  Per row of the flat batch (`[TT]`):
    seq: int32, the sequence the row belongs to (in [0, B)).
    real: bool, the row is a new token (False for padding).
    position: int32, the token's position in its sequence: kv_len + its
      offset among the sequence's new tokens (0 for padding).
  """

  slot: jax.Array
  start: jax.Array
  q_len: jax.Array
  kv_len: jax.Array
  valid: jax.Array
  seq: jax.Array
  real: jax.Array
  position: jax.Array


def check_batch(cache: PagedCache, num_tokens: int, seq_slots, cu_q_lens, num_seqs) -> None:
  """Shapes and dtypes always; with concrete metadata, that it describes a batch.

  Raises ValueError naming the argument: cu_q_lens must start at 0, never
  decrease and end (at num_seqs) within TT; num_seqs in [0, B]; the listed
  slots in [0, SQ) and distinct; no sequence more new tokens than a slot
  holds (PPS * PS).
  """
  check_shape("seq_slots", seq_slots, "(B,)", (None,))
  b = seq_slots.shape[0]
  if b < 1:
    raise ValueError(f"seq_slots shape should be (B,) with B >= 1: but got {seq_slots.shape}")
  check_shape("cu_q_lens", cu_q_lens, "(B + 1,)", (b + 1,))
  if not jnp.issubdtype(cu_q_lens.dtype, jnp.integer):
    raise ValueError(f"cu_q_lens dtype should be an integer dtype: but got {cu_q_lens.dtype}")
  check_count(num_seqs, b)
  check_slots("seq_slots", seq_slots, cache.max_seqs, num_seqs)
  if not (is_concrete(cu_q_lens) and is_concrete(num_seqs)):
    return
  cu = np.asarray(cu_q_lens)[:int(num_seqs) + 1]
  if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > num_tokens:
    raise ValueError(f"cu_q_lens should start at 0 and not decrease, up to at most TT="
                     f"{num_tokens} at num_seqs={int(num_seqs)}: but got "
                     f"{np.asarray(cu_q_lens).tolist()}")
  if (np.diff(cu) > cache.capacity).any():
    raise ValueError(f"cu_q_lens gives a sequence {int(np.diff(cu).max())} new tokens, more "
                     f"than a slot holds, PPS * PS={cache.capacity}")


def ragged(cache: PagedCache, num_tokens: int, seq_slots, cu_q_lens, num_seqs) -> Ragged:
  """The batch that the metadata describes, made safe for any traced values (module doc)."""
  tt, b = num_tokens, seq_slots.shape[0]
  seq_slots = seq_slots.astype(jnp.int32)
  count = jnp.clip(jnp.asarray(num_seqs, jnp.int32), 0, b)
  cu = lax.cummax(jnp.clip(cu_q_lens.astype(jnp.int32), 0, tt), axis=0)
  valid = listed(seq_slots, count, cache.max_seqs)
  slot = jnp.where(valid, seq_slots, 0)
  index = lax.broadcasted_iota(jnp.int32, (b,), 0)
  q_len = jnp.where(valid, cu[1:] - cu[:-1], 0)
  kv_len = jnp.where(valid, cache.lengths[slot], 0)
  row = lax.broadcasted_iota(jnp.int32, (tt, b), 0)
  # Row r belongs to the number of sequences that end at or before it.
  seq = jnp.sum((index[None, :] < count) & (cu[None, 1:] <= row), axis=1, dtype=jnp.int32)
  rows = row[:, 0]
  seq = jnp.minimum(seq, b - 1)
  real = (rows >= cu[0]) & (rows < cu[count]) & valid[seq]
  position = jnp.where(real, kv_len[seq] + rows - cu[seq], 0)
  return Ragged(slot, cu[:-1], q_len, kv_len, valid, seq, real, position)


def write(cache: PagedCache, k: jax.Array, v: jax.Array,
          batch: Ragged) -> tuple[PagedCache, jax.Array, jax.Array]:
  """Writes each sequence's new tokens into its pages, all of them or none.

  A sequence's tokens are written when every one of them finds a page: its
  slot's table has one at `position // PS`, within PPS, that no other slot
  shares (refs == 1), and the slot is not exhausted. Otherwise none is
  written, its length stays, and the slot is marked `exhausted` (sticky):
  nothing cached is lost and no other sequence is touched. The one place
  pages are written.

  Keys and values are cast to the pages' dtype (quantised, for int8 pages);
  the returned copies are what attention must use for the new tokens (as
  `kvattn.cache.append`), with padding rows zeroed.

  Args:
    cache: the cache before the write.
    k, v: `[TT, K, H]` new keys (after RoPE, if used) and values.
    batch: the `Ragged` batch of the rows.

  Returns:
    `(cache, k_new, v_new)`: k_new, v_new `[TT, K, H]` in the pages' dtype,
    float32 (dequantised) for int8 pages.
  """
  p, ps, pps, sq = cache.num_pages, cache.page_size, cache.pages_per_seq, cache.max_seqs
  real = batch.real
  k = jnp.where(real[:, None, None], k, jnp.zeros_like(k))
  v = jnp.where(real[:, None, None], v, jnp.zeros_like(v))
  if cache.quantized:
    (kq, k_scale), (vq, v_scale) = quant.quantize(k), quant.quantize(v)
    stored = dict(k_pages=kq, v_pages=vq, k_scale=k_scale, v_scale=v_scale)
    k, v = quant.dequantize(kq, k_scale), quant.dequantize(vq, v_scale)
  else:
    k, v = k.astype(cache.k_pages.dtype), v.astype(cache.v_pages.dtype)
    stored = dict(k_pages=k, v_pages=v)
  column = batch.position // ps
  slot = batch.slot[batch.seq]
  page = cache.page_table[slot, jnp.minimum(column, pps - 1)]
  owned = (page >= 0) & (page < p)
  owned &= (column < pps) & (cache.refs[jnp.clip(page, 0, p - 1)] == 1)
  missing = jnp.zeros(batch.slot.shape, jnp.int32).at[batch.seq].add(
      (real & ~owned).astype(jnp.int32))
  ok = batch.valid & ~cache.exhausted[batch.slot] & (missing == 0)
  into = jnp.where(real & ok[batch.seq], page, p)  # Page NP: dropped.
  offset = batch.position % ps
  pages = {
      name: _put(getattr(cache, name), x, into, offset, cache.layer) for name, x in stored.items()
  }
  target = jnp.where(batch.valid, batch.slot, sq)  # Slot SQ: dropped.
  lengths = cache.lengths.at[target].add(jnp.where(ok, batch.q_len, 0), mode="drop")
  refused = batch.valid & ~ok & (batch.q_len > 0)
  exhausted = cache.exhausted.at[jnp.where(refused, batch.slot, sq)].set(True, mode="drop")
  return cache._replace(lengths=lengths, exhausted=exhausted, **pages), k, v


def _put(buf: jax.Array, x: jax.Array, page: jax.Array, offset: jax.Array,
         layer: jax.Array | None = None) -> jax.Array:
  """`buf [NP, PS, ...]` with row r of `x [TT, ...]` at `[page[r], offset[r]]`; page NP: dropped.

  With a layer (a layer view's), `buf` is a stack `[L, NP, PS, ...]` and the
  rows go into its layer `layer`. A scatter, in place; a bfloat16 buffer on
  XLA:CPU is written one token at a time instead (`_put_bits`).
  """
  lead = () if layer is None else (layer,)
  if buf.dtype == jnp.bfloat16:
    return lax.platform_dependent(buf, x, page, offset, *lead, cpu=_put_bits, default=_scatter)
  return _scatter(buf, x, page, offset, *lead)


def _scatter(buf, x, page, offset, *lead):
  return buf.at[lead + (page, offset)].set(x.astype(buf.dtype), mode="drop")


def _put_bits(buf, x, page, offset, *lead):
  """`_scatter` for a bfloat16 buffer on XLA:CPU: one in-place write of its bits per token.

  XLA:CPU converts a whole bfloat16 buffer to float32 and back around a
  scatter into it (a pass over the pool, and a temporary of twice its size,
  on every call); a dynamic-update-slice of its uint16 bits under a
  conditional stays in place (as `kvattn.cache` writes a bfloat16 ring).
  """
  zero = jnp.zeros((), jnp.int32)
  tail = (zero,) * (x.ndim - 1)
  bits = lax.bitcast_convert_type(x.astype(buf.dtype), jnp.uint16)
  num_pages = buf.shape[len(lead)]

  def body(r, buf):
    def write(buf):
      token = lax.dynamic_slice(bits, (r,) + tail, (1,) + bits.shape[1:])
      token = token.reshape((1,) * (len(lead) + 1) + token.shape)
      new = lax.dynamic_update_slice(lax.bitcast_convert_type(buf, jnp.uint16), token,
                                     lead + (page[r], offset[r]) + tail)
      return lax.bitcast_convert_type(new, buf.dtype)

    return lax.cond(page[r] < num_pages, write, lambda buf: buf, buf)

  return lax.fori_loop(0, x.shape[0], body, buf)
