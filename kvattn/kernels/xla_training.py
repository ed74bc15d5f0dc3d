"""The XLA backend's training path: a sequence over itself, with a hand-written gradient.

`kvattn.dot_product_attention` (in `kvattn.attention`) checks its arguments
and calls `attend_sequence`. The forward pass is the cached path's own
computation of a chunk over itself (`kvattn.kernels.xla.attend_chunk`), so a
model trained with `dot_product_attention` sees the same numbers when it
serves from a cache. That loop has a traced trip count (causal block
skipping), which reverse mode cannot differentiate, so the gradient is
written by hand (`jax.custom_vjp`): the flash-attention backward, block by
block, recomputing each block's probabilities from the log-sum-exp the
forward pass saved.

Memory is O(T * C) in both directions: no `[B, N, T, T]` array exists.

Shape legend:
  B: batch size
  T: sequence length
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
  C: queries (or keys) in one block
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import masks
from kvattn.kernels.xla import attend_chunk, group_queries, varying_like
from kvattn.online_softmax import MASKED, normalize


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def attend_sequence(q, k, v, mask, window, causal: bool, block: int, scale: float | None,
                    softcap: float | None) -> jax.Array:
  """`kvattn.dot_product_attention` on checked inputs, padding zeroed; block is C <= T.

  window: None, or an int32 scalar array (an argument, not static: it may be
  traced). scale: the logits' scale (None: 1/sqrt(H)); softcap: None or c,
  logits capped to `c * tanh(logit / c)`: Python floats, static.
  """
  return _forward(q, k, v, mask, window, causal, block, scale, softcap)[0]


def _forward(q, k, v, mask, window, causal: bool, block: int, scale, softcap):
  """The output, and what the backward pass needs.

  Returns:
    `(o, (q, k, v, mask, o_rows, lse))`: o `[B, T, N, H]` in q's dtype;
    o_rows float32 `[B, K*G*T, H]`, the output in `attend_chunk`'s rows; lse
    float32 `[B, K*G*T]`, each row's log-sum-exp of its logits (0 for a
    padded query, which saw no key).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  positions = None if window is None else masks.real_before(mask)
  part = attend_chunk(group_queries(q, kh, scale), k, v, mask, not causal, block, positions, window,
                      softcap=softcap)
  o_rows = normalize(part)
  seen = part.l > 0.0
  lse = jnp.where(seen, part.m + jnp.log(jnp.where(seen, part.l, 1.0)), 0.0)
  o = o_rows.reshape(b, kh, n // kh, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return o.astype(q.dtype), (q, k, v, mask, window, o_rows, lse)


def _backward(causal: bool, block: int, scale, softcap, residuals, do):
  """The flash-attention backward, in two blockwise passes.

  With P the probabilities, D = rowsum(dO * O) and dS = P * (dO V^T - D):
  a pass over query blocks sums dq = dS K over key blocks; a pass over key
  blocks sums dk = dS^T q and dv = P^T dO over query blocks (and over the G
  query heads of each kv head). Causal passes skip the blocks above the
  diagonal. Only the current block's `[B, K, G, C, C]` probabilities exist.
  """
  q, k, v, mask, window, o_rows, lse = residuals
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  num_blocks = -(-t // block)
  padded = num_blocks * block
  pad = lambda x, axis: jnp.pad(x, [(0, padded - t if a == axis else 0) for a in range(x.ndim)])
  f32 = jnp.float32
  qh = group_queries(q, kh, scale)  # Scaled: dS^T qh is dk, dS K is the gradient of qh.
  # A padded row's output is zero, but its cotangent may be anything (NaN).
  do = jnp.where(mask[:, :, None, None], do.astype(f32), 0.0)
  doh = do.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  delta = jnp.sum(doh * o_rows.reshape(b, kh, g, t, h), axis=-1)  # [B, K, G, T]
  qh, doh = pad(qh, 3), pad(doh, 3)
  delta, lse = pad(delta, 3), pad(lse.reshape(b, kh, g, t), 3)
  kt, vt = (pad(x.astype(f32).transpose(0, 2, 1, 3), 2) for x in (k, v))  # [B, K, T, H]
  mask = pad(mask, 1)
  positions = masks.real_before(mask)
  take = lambda x, i, axis: lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)
  # Inside shard_map, the loops' carries must vary over the mesh axes that
  # what they read varies over.
  reads = (qh, doh, delta, lse, kt, vt, mask, positions)

  def block_grads(i, j):
    """P and dS `[B, K, G, C, C]` of query block i over key block j."""
    allowed = masks.padding_mask(take(mask, i, 1), take(mask, j, 1))
    if causal:
      allowed = masks.combine_masks(allowed, masks.causal_mask(block, block, (i - j) * block))
    if window is not None:
      allowed = allowed & masks.window_mask(take(positions, i, 1), take(positions, j, 1), window)
    logits = jnp.einsum("BKGTH,BKCH->BKGTC", take(qh, i, 3), take(kt, j, 2))
    if softcap is not None:
      tanh = jnp.tanh(logits / softcap)
      logits = softcap * tanh
    shifted = logits - take(lse, i, 3)[..., None]
    p = jnp.exp(jnp.where(allowed[:, None, None], shifted, MASKED))  # exp(MASKED) == 0.
    dp = jnp.einsum("BKGTH,BKCH->BKGTC", take(doh, i, 3), take(vt, j, 2))
    ds = p * (dp - take(delta, i, 3)[..., None])
    if softcap is not None:  # Through the cap: d(c tanh(x / c)) / dx = 1 - tanh^2.
      ds = ds * (1.0 - tanh * tanh)
    return p, ds

  def dq_block(i):
    def body(j, dq):
      return dq + jnp.einsum("BKGTC,BKCH->BKGTH", block_grads(i, j)[1], take(kt, j, 2))

    init = varying_like(jnp.zeros((b, kh, g, block, h), f32), (reads, i))
    return lax.fori_loop(0, i + 1 if causal else num_blocks, body, init)

  def dkv_block(j):
    def body(i, acc):
      p, ds = block_grads(i, j)
      dk = acc[0] + jnp.einsum("BKGTC,BKGTH->BKCH", ds, take(qh, i, 3))
      dv = acc[1] + jnp.einsum("BKGTC,BKGTH->BKCH", p, take(doh, i, 3))
      return dk, dv

    init = varying_like((jnp.zeros((b, kh, block, h), f32),) * 2, (reads, j))
    return lax.fori_loop(j if causal else 0, num_blocks, body, init)

  blocks = jnp.arange(num_blocks, dtype=jnp.int32)
  dq = lax.map(dq_block, blocks)  # [num_blocks, B, K, G, C, H]
  dk, dv = lax.map(dkv_block, blocks)  # [num_blocks, B, K, C, H] each
  dq = jnp.moveaxis(dq, 0, 3).reshape(b, kh, g, padded,
                                      h)[:, :, :, :t] * (h**-0.5 if scale is None else scale)
  dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, kh, padded, h)[:, :, :t].transpose(
      0, 2, 1, 3)
  return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None)


attend_sequence.defvjp(_forward, _backward)
