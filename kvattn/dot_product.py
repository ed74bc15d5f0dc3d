"""Attention over one whole sequence, without a cache, differentiable: for training.

The forward pass is the cached path's own computation of a chunk over itself
(`kvattn.kernels.xla.attend_chunk`), so a model trained with
`dot_product_attention` sees the same numbers when it serves from a cache.
That loop has a traced trip count (causal block skipping), which reverse mode
cannot differentiate, so the gradient is written by hand (`jax.custom_vjp`):
the flash-attention backward, block by block, recomputing each block's
probabilities from the log-sum-exp the forward pass saved.

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
from kvattn._checks import check_heads, check_mask, check_positive_ints, check_shape
from kvattn._checks import is_concrete
from kvattn.kernels import xla
from kvattn.online_softmax import MASKED, normalize


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """Self-attention of T tokens, with the cached path's numbers and a gradient.

  Each query attends to the real keys at or before its own position (all of
  them with `causal=False`), skipping padding, which may be anywhere. Padded
  queries give zeros. Logits and softmax are float32 whatever the input
  dtype; scale is 1/sqrt(H). Query head n uses kv head n // G.

  The output equals `kvattn.cached_attention` (implementation "xla") on an
  empty cache to float32 rounding; `causal=False` is its `prefix_lm=True`.

  Differentiable in first-order reverse mode (`jax.grad`, `jax.vjp`): the
  gradient is a `jax.custom_vjp`, so forward mode (`jax.jvp`, `jax.jacfwd`)
  raises. Second order is not supported: with `causal=True`, `jax.grad` of
  the gradient raises (its loops have traced trip counts); with
  `causal=False` it happens to run, untested.
  Gradients are computed in float32 and returned in each input's dtype; at
  padded positions they are exactly zero, and whatever padded q, k or v hold
  (NaN, inf) reaches neither the output nor any gradient.

  Memory is O(T * C) forward and backward: queries and keys go in blocks of C.

  Args:
    q: `[B, T, N, H]` queries (after RoPE, if used), T >= 1.
    k: `[B, T, K, H]` keys (after RoPE, if used).
    v: `[B, T, K, H]` values.
    mask: bool `[B, T]`, True for real tokens, False for padding (left,
      right, or anywhere); None means all real.
    causal: a Python bool; False lets every token see every real token.
    window: None, or W (causal only): a token at position p sees the real
      tokens at positions p - W + 1 .. p only, positions counting real tokens
      (a ring cache's sliding window, `kvattn.init_cache(..., window=W)`).
      A positive int, or an integer jax scalar (which may be traced).
    block_size: C, queries (and keys) per block; None for
      `kvattn.kernels.xla.BLOCK_Q`. Capped at T. Tuning only: it changes
      the result by float32 rounding at most.

  Returns:
    o `[B, T, N, H]` in q's dtype.
  """
  mask = _check(q, k, v, mask, causal, block_size)
  if window is not None:
    if getattr(window, "shape", None) == () and hasattr(window, "dtype") and jnp.issubdtype(
        window.dtype, jnp.integer):
      if is_concrete(window) and not int(window) > 0:
        raise ValueError(f"window should be a positive int: but got {window!r}")
      window = jnp.asarray(window, jnp.int32)  # A jax scalar (per layer under scan, say).
    else:
      check_positive_ints(window=window)
      window = jnp.int32(window)
    if not causal:
      raise ValueError(f"window should be None with causal=False: but got {window!r}")
  block = min(block_size or xla.BLOCK_Q, q.shape[1])
  # Zeroed out here, outside the custom_vjp: padding cannot reach any
  # arithmetic, and jnp.where gives it an exactly zero gradient.
  real = mask[:, :, None, None]
  q, k, v = (jnp.where(real, x, jnp.zeros_like(x)) for x in (q, k, v))
  return _attention(q, k, v, mask, window, causal, block)


def _check(q, k, v, mask, causal, block_size) -> jax.Array:
  """Checks every argument; returns the mask (all True for None)."""
  check_shape("q", q, "(B, T, N, H)", (None, None, None, None))
  b, t, n, h = q.shape
  check_shape("k", k, "(B, T, K, H)", (b, t, None, h))
  kh = k.shape[2]
  check_shape("v", v, "(B, T, K, H)", (b, t, kh, h))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} dtype should be a floating dtype: but got {x.dtype}")
  if min(t, n, h) < 1:
    raise ValueError(f"q shape should be (B, T, N, H) with T, N, H >= 1: but got {q.shape}")
  if kh < 1:
    raise ValueError(f"k shape should be (B, T, K, H) with K >= 1: but got {k.shape}")
  check_heads(n, kh)
  if not isinstance(causal, bool):
    raise TypeError(f"causal should be a Python bool: but got {causal!r}")
  if block_size is not None:
    check_positive_ints(block_size=block_size)
  if mask is None:
    return jnp.ones((b, t), jnp.bool_)
  check_mask(mask, b, t)
  return mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, window, causal: bool, block: int) -> jax.Array:
  """`dot_product_attention` on checked inputs, padding zeroed; block is C <= T.

  window: None, or an int32 scalar array (an argument, not static: it may be
  traced).
  """
  return _forward(q, k, v, mask, window, causal, block)[0]


def _positions(mask):
  """int32 `[B, T]`: real tokens before each token (a padding token: the next one's)."""
  return masks.real_before(mask)


def _forward(q, k, v, mask, window, causal: bool, block: int):
  """The output, and what the backward pass needs.

  Returns:
    `(o, (q, k, v, mask, o_rows, lse))`: o `[B, T, N, H]` in q's dtype;
    o_rows float32 `[B, K*G*T, H]`, the output in `attend_chunk`'s rows; lse
    float32 `[B, K*G*T]`, each row's log-sum-exp of its logits (0 for a
    padded query, which saw no key).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  positions = None if window is None else _positions(mask)
  part = xla.attend_chunk(xla.group_queries(q, kh), k, v, mask, not causal, block, positions,
                          window)
  o_rows = normalize(part)
  seen = part.l > 0.0
  lse = jnp.where(seen, part.m + jnp.log(jnp.where(seen, part.l, 1.0)), 0.0)
  o = o_rows.reshape(b, kh, n // kh, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return o.astype(q.dtype), (q, k, v, mask, window, o_rows, lse)


def _backward(causal: bool, block: int, residuals, do):
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
  qh = xla.group_queries(q, kh)  # Scaled: dS^T qh is dk, dS K is the gradient of qh.
  # A padded row's output is zero, but its cotangent may be anything (NaN).
  do = jnp.where(mask[:, :, None, None], do.astype(f32), 0.0)
  doh = do.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  delta = jnp.sum(doh * o_rows.reshape(b, kh, g, t, h), axis=-1)  # [B, K, G, T]
  qh, doh = pad(qh, 3), pad(doh, 3)
  delta, lse = pad(delta, 3), pad(lse.reshape(b, kh, g, t), 3)
  kt, vt = (pad(x.astype(f32).transpose(0, 2, 1, 3), 2) for x in (k, v))  # [B, K, T, H]
  mask = pad(mask, 1)
  positions = _positions(mask)
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
    shifted = logits - take(lse, i, 3)[..., None]
    p = jnp.exp(jnp.where(allowed[:, None, None], shifted, MASKED))  # exp(MASKED) == 0.
    dp = jnp.einsum("BKGTH,BKCH->BKGTC", take(doh, i, 3), take(vt, j, 2))
    return p, p * (dp - take(delta, i, 3)[..., None])

  def dq_block(i):
    def body(j, dq):
      return dq + jnp.einsum("BKGTC,BKCH->BKGTH", block_grads(i, j)[1], take(kt, j, 2))
    init = xla.varying_like(jnp.zeros((b, kh, g, block, h), f32), (reads, i))
    return lax.fori_loop(0, i + 1 if causal else num_blocks, body, init)

  def dkv_block(j):
    def body(i, acc):
      p, ds = block_grads(i, j)
      dk = acc[0] + jnp.einsum("BKGTC,BKGTH->BKCH", ds, take(qh, i, 3))
      dv = acc[1] + jnp.einsum("BKGTC,BKGTH->BKCH", p, take(doh, i, 3))
      return dk, dv
    init = xla.varying_like((jnp.zeros((b, kh, block, h), f32),) * 2, (reads, j))
    return lax.fori_loop(j if causal else 0, num_blocks, body, init)

  blocks = jnp.arange(num_blocks, dtype=jnp.int32)
  dq = lax.map(dq_block, blocks)  # [num_blocks, B, K, G, C, H]
  dk, dv = lax.map(dkv_block, blocks)  # [num_blocks, B, K, C, H] each
  dq = jnp.moveaxis(dq, 0, 3).reshape(b, kh, g, padded, h)[:, :, :, :t] * (h ** -0.5)
  dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, kh, padded, h)[:, :, :t].transpose(
      0, 2, 1, 3)
  return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None,
          None)


_attention.defvjp(_forward, _backward)
