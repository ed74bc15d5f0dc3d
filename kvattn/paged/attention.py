"""Ragged paged attention: one call for a batch of prefill chunks and decode tokens.

`paged_attention` checks its arguments once, writes the new tokens into
their pages (`kvattn.paged.batch.write`), and hands the attention to a
backend: a `PagedBackend` record from `BACKENDS`, picked by
`implementation=` ("xla", the portable kernel of `kvattn.paged.xla`, is the
only one today and the default everywhere). A TPU or GPU paged kernel (jax's
`ragged_paged_attention`, a Pallas kernel) plugs in as one more record with
the same entry point:

    attend(q, k_new, v_new, cache, batch, *, block_q, block_kv, scale,
           softcap) -> (o, cache)

  q: `[TT, N, H]` queries; k_new, v_new: `[TT, K, H]` the new tokens as the
  pages hold them. cache: the `PagedCache` after the write. batch: the
  `kvattn.paged.batch.Ragged` batch: per sequence its slot, first row, new
  tokens (`q_len`), cached tokens before the call (`kv_len`) and whether it
  is one; per row its sequence, whether it is real, its position. That is
  the ragged paged attention contract: `cu_q_lens` is `start` with the last
  end, `kv_lens` is `kv_len + q_len`, `page_indices` is
  `cache.page_table[slot]`. A sequence whose write was refused has its new
  tokens in k_new and v_new only: a backend that reads them from the pages
  must take them from there instead.

Shape legend:
  TT: tokens in the flat batch
  B: sequences in the batch
  N: number of query heads
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from kvattn import attention as dense_attention
from kvattn._checks import check_heads, check_positive_ints, check_shape
from kvattn.paged import batch as batch_lib
from kvattn.paged import xla
from kvattn.paged.cache import PagedCache, check_one_layer, check_page_table, check_paged_cache


@dataclasses.dataclass(frozen=True)
class PagedBackend:
  """One paged attention kernel: its entry point (module doc) and where it compiles.

  Attributes:
    name: the `implementation=` name.
    attend: the entry point.
    platforms: the lowering platforms it compiles for; None for every one.
  """
  name: str
  attend: Callable
  platforms: tuple[str, ...] | None = None


BACKENDS: dict[str, PagedBackend] = {"xla": PagedBackend("xla", xla.attend)}


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: PagedCache,
    seq_slots: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: int | jax.Array,
    *,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, PagedCache]:
  """Attends a ragged batch of new tokens over their sequences' pages, then caches them.

  Sequence i of the batch is cache slot `seq_slots[i]`; its new tokens are
  rows `cu_q_lens[i] .. cu_q_lens[i + 1]` of the flat batch, at positions
  `cache.lengths[slot]` onwards. Each new token sees its sequence's cached
  tokens and the earlier new tokens of its own sequence (causal). Prefill
  chunks and decode tokens mix freely. Rows from `cu_q_lens[num_seqs]` on
  are padding: they see nothing, give zeros and write nothing.

  Each token is written into its slot's page for its position, which
  `kvattn.paged.reserve` must have provided. A sequence with a token
  without a page (or already exhausted) writes none of them: its cached
  tokens and length stay and the slot is marked `exhausted`, but its output
  is still computed over its cached and new tokens. No sequence ever writes
  into a page of another.

  Logits and softmax are float32 for every storage dtype; scale is 1/sqrt(H)
  unless given; query head n uses kv head n // (N // K). Int8 pages are
  dequantised as the dense cache's are.

  With concrete metadata, metadata that does not describe a batch raises
  ValueError (`kvattn.paged.batch.check_batch`); traced, it is made safe
  instead: entries past num_seqs, out of range or repeating a slot are
  ignored, and cu_q_lens is clipped and made non-decreasing.

  Args:
    q: `[TT, N, H]` queries (after RoPE, if used).
    k, v: `[TT, K, H]` new keys (after RoPE, if used) and values.
    cache: the `PagedCache`: one layer's, or a layer view of a stack
      (`kvattn.paged.layer_view`), whose layer's pages are read and written.
    seq_slots: int `[B]` the cache slot of each sequence of the batch.
    cu_q_lens: int `[B + 1]` row offsets of the sequences, from 0.
    num_seqs: int or integer scalar (may be traced): the sequences in the
      batch; entries of seq_slots from it on are unused.
    implementation: None (the default, "xla") or a name from `BACKENDS`.
    block_q: queries per tile of a prefill chunk; None for the backend's
      default.
    block_kv: cached tokens per block (whole pages); None for the default.
      Neither changes the result beyond float32 rounding.
    scale: the logits' scale, a positive Python float; None for 1/sqrt(H).
    softcap: None, or c: each logit becomes `c * tanh(logit / c)` first.

  Returns:
    `(o, cache)`: o `[TT, N, H]` in q's dtype, and the updated cache.
  """
  check_paged_cache(cache)
  check_one_layer(cache)
  check_qkv(q, k, v, cache)
  check_options(implementation, block_q, block_kv, scale, softcap)
  batch_lib.check_batch(cache, q.shape[0], seq_slots, cu_q_lens, num_seqs)
  check_page_table(cache)
  batch = batch_lib.ragged(cache, q.shape[0], seq_slots, cu_q_lens, num_seqs)
  return attend(q, k, v, cache, batch, implementation=implementation, block_q=block_q,
                block_kv=block_kv, scale=scale, softcap=softcap)


def check_qkv(q, k, v, cache: PagedCache) -> None:
  """q `[TT, N, H]`, k and v `[TT, K, H]` against the cache's K and H; floating; TT >= 1."""
  kh, h = cache.num_kv_heads, cache.head_dim
  check_shape("q", q, "(TT, N, H)", (None, None, h))
  tt, n, _ = q.shape
  if tt < 1:
    raise ValueError(f"q shape should be (TT, N, H) with TT >= 1: but got {q.shape}")
  check_shape("k", k, "(TT, K, H)", (tt, kh, h))
  check_shape("v", v, "(TT, K, H)", (tt, kh, h))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} dtype should be a floating dtype: but got {x.dtype}")
  check_heads(n, kh)


def check_options(implementation, block_q, block_kv, scale, softcap) -> None:
  """implementation, the block sizes, scale and softcap."""
  if implementation is not None and implementation not in BACKENDS:
    raise ValueError(f"implementation should be None or one of {sorted(BACKENDS)}: but got "
                     f"{implementation!r}")
  check_positive_ints(**{
      name: size for name, size in (("block_q", block_q), ("block_kv", block_kv))
      if size is not None
  })
  dense_attention.check_logits(scale, softcap)
  backend = BACKENDS[implementation or "xla"]
  here = dense_attention.current_platform()
  if backend.platforms is not None and here not in backend.platforms:
    raise ValueError(f"implementation={backend.name!r} cannot run on {here}: it compiles for "
                     f"{', '.join(backend.platforms)}")


def attend(q, k, v, cache: PagedCache, batch: batch_lib.Ragged, *, implementation=None,
           block_q=None, block_kv=None, scale=None, softcap=None) -> tuple[jax.Array, PagedCache]:
  """`paged_attention` on a made `Ragged` batch, without the checks (`kvattn.paged.layer`)."""
  scale = q.shape[-1]**-0.5 if scale is None else float(scale)
  softcap = None if softcap is None else float(softcap)
  cache, k_new, v_new = batch_lib.write(cache, k, v, batch)
  backend = BACKENDS[implementation or "xla"]
  return backend.attend(q, k_new, v_new, cache, batch, block_q=block_q, block_kv=block_kv,
                        scale=scale, softcap=softcap)
