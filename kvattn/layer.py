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

from kvattn import attention
from kvattn import rope
from kvattn._checks import check_cache, check_mask, check_shape
from kvattn.cache import KVCache, token_positions
from kvattn.params import Params, check_params


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
  _check(params, cache, x, mask, prefix_lm, rope_base, implementation)
  return _prefill(params, cache, x, mask, prefix_lm=prefix_lm, rope_base=rope_base,
                  implementation=implementation)


def _prefill(params, cache, x, mask, *, prefix_lm, rope_base, implementation):
  """`prefill` without the checks."""
  t = x.shape[1]
  q = _project(x, params["wq"], params.get("bq"))
  k = _project(x, params["wk"], params.get("bk"))
  v = _project(x, params["wv"], params.get("bv"))
  if rope_base is not None:
    positions = token_positions(cache, mask, num_tokens=t)
    q = rope.rotate(q, positions, rope_base)
    k = rope.rotate(k, positions, rope_base)
  full = jnp.ones(x.shape[:2], jnp.bool_) if mask is None else mask
  o, cache = attention.attend(q, k, v, cache, full, prefix_lm=prefix_lm,
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
  _check(params, cache, x, None, False, rope_base, implementation, decode=True)
  return _prefill(params, cache, x, None, prefix_lm=False, rope_base=rope_base,
                  implementation=implementation)


def _check(params, cache, x, mask, prefix_lm, rope_base, implementation, decode=False) -> None:
  """The checks of `prefill` and `decode_step`, once per call."""
  check_cache(cache)
  b, _, kh, h = cache.k.shape
  dm, _ = check_params(params, kh, h)
  if decode:
    check_shape("x", x, "(B, 1, DM)", (b, 1, dm))
  else:
    check_shape("x", x, "(B, T, DM)", (b, None, dm))
  t = x.shape[1]
  if t < 1:
    raise ValueError(f"x shape should be (B, T, DM) with T >= 1: but got {x.shape}")
  if t > cache.max_len:
    raise ValueError(f"x has T={t} new tokens, more than the cache's max_len S={cache.max_len}")
  if mask is not None:
    check_mask(mask, b, t)
  attention.check_options(prefix_lm, implementation)
  if rope_base is not None:
    rope.check_base(rope_base)


def _project(x, w, bias):
  """x [B, T, DM] @ w [DM, heads, H] (+ bias [heads, H]) -> [B, T, heads, H]."""
  y = jnp.einsum("BTD,DXH->BTXH", x, w)  # X: N or K heads.
  return y if bias is None else y + bias[None, None]
