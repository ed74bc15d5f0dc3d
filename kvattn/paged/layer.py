"""The attention layer over a paged cache: one call for a ragged batch.

`paged_prefill` is `kvattn.prefill` for a `PagedCache`: the same
projections, qk-norm and RoPE (`kvattn.layer.project_qkv`), each token
rotated at its own position in its own sequence, then `paged_attention`,
then the output projection. A decode step is the same call with one token
per sequence.

Shape legend:
  TT: tokens in the flat batch
  B: sequences in the batch
  DM: model width
"""

from __future__ import annotations

import jax

from kvattn import layer
from kvattn import rope
from kvattn._checks import check_shape
from kvattn.paged import attention
from kvattn.paged import batch as batch_lib
from kvattn.paged.cache import PagedCache, check_one_layer, check_page_table, check_paged_cache
from kvattn.params import Params, check_params


def paged_prefill(
    params: Params,
    cache: PagedCache,
    x: jax.Array,
    seq_slots: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: int | jax.Array,
    *,
    rope_base: float | None = None,
    rope_scaling: rope.Scaling | None = None,
    rotary_dim: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    qk_norm_eps: float = 1e-6,
    implementation: str | None = None,
) -> tuple[jax.Array, PagedCache]:
  """Runs a ragged batch of new tokens through attention and caches them in their pages.

  The batch is described as in `kvattn.paged.paged_attention`: sequence i
  is slot `seq_slots[i]`, its tokens rows `cu_q_lens[i] .. cu_q_lens[i + 1]`
  of x; rows from `cu_q_lens[num_seqs]` on are padding. Token j of sequence
  i is at position `cache.lengths[seq_slots[i]] + j`, where RoPE rotates it.
  Reserve the pages first (`kvattn.paged.reserve`).

  Args:
    params: attention params (see `kvattn.params`).
    cache: the `PagedCache`: one layer's, or a layer view of a stack
      (`kvattn.paged.layer_view`; `kvattn.paged.scan_layers`).
    x: `[TT, DM]` inputs.
    seq_slots: int `[B]`; cu_q_lens: int `[B + 1]`; num_seqs: int or integer
      scalar: the batch, as in `paged_attention`.
    rope_base, rope_scaling, rotary_dim, scale, softcap, qk_norm_eps: as in
      `kvattn.prefill`. "longrope" scaling is refused: it picks its factors
      from the longest position of the whole call, which in a ragged batch
      would let one sequence change another's rotation.
    implementation: as in `paged_attention`.

  Returns:
    `(out, cache)`: out `[TT, DM]` in x's dtype, zeros at padding.
  """
  options = layer.Options(rope_base, rope_scaling, rotary_dim, scale, softcap, qk_norm_eps)
  check_paged_cache(cache)
  check_one_layer(cache)
  dm, _ = check_params(params, cache.num_kv_heads, cache.head_dim)
  check_shape("x", x, "(TT, DM)", (None, dm))
  layer.check_x_dtype(x)
  if x.shape[0] < 1:
    raise ValueError(f"x shape should be (TT, DM) with TT >= 1: but got {x.shape}")
  layer.check_options(options, params)
  if rope_scaling is not None and rope_scaling.kind == "longrope":
    raise ValueError("rope_scaling kind 'longrope' is not supported with a paged cache: it picks "
                     "its factors from the whole call's longest position")
  attention.check_options(implementation, None, None, scale, softcap)
  batch_lib.check_batch(cache, x.shape[0], seq_slots, cu_q_lens, num_seqs)
  check_page_table(cache)
  batch = batch_lib.ragged(cache, x.shape[0], seq_slots, cu_q_lens, num_seqs)
  q, k, v = layer.project_qkv(params, x[None], batch.position[None], options)
  o, cache = attention.attend(q[0], k[0], v[0], cache, batch, implementation=implementation,
                              scale=scale, softcap=softcap)
  out = layer.project_out(params, o[None], batch.real[None], x.dtype)[0]
  return out, cache


def token_positions(cache: PagedCache, num_tokens: int, seq_slots: jax.Array, cu_q_lens: jax.Array,
                    num_seqs: int | jax.Array) -> jax.Array:
  """int32 `[TT]`: each row's position in its own sequence (0 at padding).

  For learned position embeddings, or RoPE applied by the caller of
  `paged_attention`: the positions `paged_prefill` rotates at.
  """
  check_paged_cache(cache)
  batch_lib.check_batch(cache, num_tokens, seq_slots, cu_q_lens, num_seqs)
  return batch_lib.ragged(cache, num_tokens, seq_slots, cu_q_lens, num_seqs).position


def token_mask(cache: PagedCache, num_tokens: int, seq_slots: jax.Array, cu_q_lens: jax.Array,
               num_seqs: int | jax.Array) -> jax.Array:
  """bool `[TT]`: True at the rows that are new tokens, False at padding.

  The rows the kernel treats as tokens (after the metadata is made safe, as
  `paged_attention` does under jit): e.g. to zero a model's logits at padding.
  """
  check_paged_cache(cache)
  batch_lib.check_batch(cache, num_tokens, seq_slots, cu_q_lens, num_seqs)
  return batch_lib.ragged(cache, num_tokens, seq_slots, cu_q_lens, num_seqs).real
