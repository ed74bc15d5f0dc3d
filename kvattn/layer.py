"""Cached multi-head attention layer: prefill and decode_step.

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  DM: model width
  N: number of query heads
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvattn._checks import check_cache, check_mask, check_shape
from kvattn.attention import cached_attention
from kvattn.cache import KVCache, token_positions
from kvattn.params import Params, check_params
from kvattn.rope import apply_rope


def prefill(
    params: Params,
    cache: KVCache,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    prefix_lm: bool | jax.Array = False,
    rope_base: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, KVCache]:
  """Runs T >= 1 new tokens through attention in one pass and caches them.

  Works at any cache index: the new tokens attend causally to each other and
  to every valid cached token, so a long prompt may be fed in chunks, and a
  conversation may go on after generation.

  Args:
    params: attention params (see `kvattn.params`).
    cache: the `KVCache` to read and append to.
    x: `[B, T, DM]` inputs.
    mask: bool `[B, T]`, True for real tokens, False for padding on the left
      or the right; None means all real.
    prefix_lm: if True the tokens of this call see each other bidirectionally
      (they still see the cache); later decode steps are causal.
    rope_base: None for no rotary embedding (e.g. models with learned
      positions); a float applies RoPE to q and k at each token's position in
      its own sequence (see `kvattn.token_positions`).
    implementation: the attention implementation, as in
      `kvattn.cached_attention`; None for the platform's default.

  Returns:
    `(out, new_cache)`: out `[B, T, DM]` in x's dtype, zeros at padding.
  """
  check_cache(cache)
  b, _, kh, h = cache.k.shape
  dm, _ = check_params(params, kh, h)
  check_shape("x", x, "(B, T, DM)", (b, None, dm))
  t = x.shape[1]
  if t < 1:
    raise ValueError(f"x shape should be (B, T, DM) with T >= 1: but got {x.shape}")
  if mask is not None:
    check_mask(mask, b, t)

  q = _project(x, params["wq"], params.get("bq"))
  k = _project(x, params["wk"], params.get("bk"))
  v = _project(x, params["wv"], params.get("bv"))
  if rope_base is not None:
    positions = token_positions(cache, mask, num_tokens=t)
    q = apply_rope(q, positions, rope_base)
    k = apply_rope(k, positions, rope_base)
  o, cache = cached_attention(q, k, v, cache, mask, prefix_lm=prefix_lm,
                              implementation=implementation)
  out = jnp.einsum("BTNH,NHD->BTD", o, params["wo"])
  if "bo" in params:
    out = out + params["bo"][None, None]
  if mask is not None:
    out = jnp.where(mask[:, :, None], out, 0)
  return out.astype(x.dtype), cache


def decode_step(
    params: Params,
    cache: KVCache,
    x: jax.Array,
    *,
    rope_base: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, KVCache]:
  """Appends one token per row and attends over everything cached.

  Args:
    params: attention params.
    cache: the `KVCache` to read and append to.
    x: `[B, 1, DM]` inputs, one real token per row.
    rope_base: as in `prefill`.
    implementation: as in `prefill`.

  Returns:
    `(out [B, 1, DM], new_cache)`.
  """
  check_cache(cache)
  check_shape("x", x, "(B, 1, DM)", (cache.batch_size, 1, None))
  return prefill(params, cache, x, rope_base=rope_base, implementation=implementation)


def _project(x, w, bias):
  """x [B,T,DM] @ w [DM,M,H] (+ bias [M,H]) -> [B,T,M,H]."""
  y = jnp.einsum("BTD,DMH->BTMH", x, w)
  return y if bias is None else y + bias[None, None]
