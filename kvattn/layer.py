"""The multi-head attention layer: prefill and decode_step with a cache, self_attention without.

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

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import attention
from kvattn import masks
from kvattn import rope
from kvattn._checks import check_cache, check_mask, check_shape, is_real
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
    rope_scaling: rope.Scaling | None = None,
    implementation: str | None = None,
    rotary_dim: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    qk_norm_eps: float = 1e-6,
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
    rope_scaling: None, or a `kvattn.rope.Scaling` of RoPE's frequencies
      (Llama 3.1's "llama3", or "linear"); needs rope_base.
    implementation: the attention implementation, as in
      `kvattn.cached_attention`; None for the platform's default.
    rotary_dim: None to rotate all H features; R (even, <= H) to rotate the
      first R only (Phi's `partial_rotary_factor`); needs rope_base.
    scale: the logits' scale, as in `kvattn.cached_attention` (None:
      1/sqrt(H)).
    softcap: None, or the logits' soft cap, as in `kvattn.cached_attention`.
    qk_norm_eps: the epsilon of the qk-norm, used when the params hold its
      scales (`q_norm`/`k_norm`, or `q_norm_proj`/`k_norm_proj`).

  Returns:
    `(out, new_cache)`: out `[B, T, DM]` in x's dtype, zeros at padding.
  """
  options = Options(rope_base, rope_scaling, rotary_dim, scale, softcap, qk_norm_eps)
  _check(params, cache, x, mask, prefix_lm, options, implementation)
  return _prefill(params, cache, x, mask, prefix_lm=prefix_lm, options=options,
                  implementation=implementation)


class Options(NamedTuple):
  """The layer's static settings beyond the params (see `prefill`'s arguments)."""
  rope_base: float | None = None
  rope_scaling: rope.Scaling | None = None
  rotary_dim: int | None = None
  scale: float | None = None
  softcap: float | None = None
  qk_norm_eps: float = 1e-6


def _prefill(params, cache, x, mask, *, prefix_lm, options: Options, implementation):
  """`prefill` without the checks."""
  positions = token_positions(cache, mask, num_tokens=x.shape[1])
  q, k, v = project_qkv(params, x, _real_positions(positions, mask), options)
  full = jnp.ones(x.shape[:2], jnp.bool_) if mask is None else mask
  o, cache = attention.attend(q, k, v, cache, full, prefix_lm=prefix_lm,
                              implementation=implementation, scale=options.scale,
                              softcap=options.softcap)
  return project_out(params, o, mask, x.dtype), cache


def self_attention(
    params: Params,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
    rope_base: float | None = None,
    rope_scaling: rope.Scaling | None = None,
    block_size: int | None = None,
    rotary_dim: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    qk_norm_eps: float = 1e-6,
) -> jax.Array:
  """The attention layer over whole sequences, without a cache: for training.

  The same projections, RoPE and attention numerics as `prefill` on an empty
  cache (through `kvattn.dot_product_attention`), and reverse-differentiable,
  with memory O(T * block) rather than O(T^2).

  Args:
    params: attention params (see `kvattn.params`).
    x: `[B, T, DM]` inputs.
    mask: bool `[B, T]`, True for real tokens (padding anywhere); None: all
      real. Positions count real tokens only, as in `prefill`.
    causal: False for bidirectional attention (prefix-LM over the whole input).
    window: None, or W: the sliding window of a ring cache
      (`kvattn.init_cache(..., window=W)`), so that training matches it.
    rope_base: as in `prefill`.
    rope_scaling: as in `prefill`.
    block_size: as in `kvattn.dot_product_attention`.
    rotary_dim, scale, softcap, qk_norm_eps: as in `prefill`.

  Returns:
    out `[B, T, DM]` in x's dtype, zeros at padding.
  """
  # No cache to take K and H from: they come from wk, checked first.
  wk = params.get("wk") if isinstance(params, Mapping) else None
  shape = getattr(wk, "shape", None)
  if shape is not None and len(shape) == 3:
    dm, _ = check_params(params, shape[1], shape[2])
  elif isinstance(params, Mapping) and wk is not None:
    raise ValueError(f"params['wk'] shape should be (DM, K, H): but got {shape}")
  else:
    dm, _ = check_params(params, 1, 1)  # Raises: not a dict, or no wk.
  check_shape("x", x, "(B, T, DM)", (None, None, dm))
  check_x_dtype(x)
  b, t, _ = x.shape
  if mask is not None:
    check_mask(mask, b, t)
  options = Options(rope_base, rope_scaling, rotary_dim, scale, softcap, qk_norm_eps)
  check_options(options, params)
  return _self_attention(params, x, mask, causal=causal, window=window, options=options,
                         block_size=block_size)


def _self_attention(params, x, mask, *, causal, window, options: Options, block_size):
  """`self_attention` without the checks of params, x and the RoPE settings."""
  if mask is None:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  else:
    # As token_positions on an empty cache.
    positions = _real_positions(masks.real_before(mask), mask)
    x = jnp.where(mask[:, :, None], x, jnp.zeros_like(x))  # No NaN at padding in the grads.
  q, k, v = project_qkv(params, x, positions, options)
  o = attention.dot_product_attention(q, k, v, mask, causal=causal, window=window,
                                      block_size=block_size, scale=options.scale,
                                      softcap=options.softcap)
  return project_out(params, o, mask, x.dtype)


def _real_positions(positions: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Positions for RoPE: padding at 0, so that it never raises a call's largest position.

  A padding token's own rotation is never seen (it is never attended), but
  LongRoPE picks its factors from the call's largest position (Hugging
  Face's per-call rule): right padding must not push it past the real tokens'.
  """
  return positions if mask is None else jnp.where(mask, positions, 0)


def project_qkv(params: Params, x: jax.Array, positions: jax.Array,
                options: Options) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q `[B, T, N, H]`, k, v `[B, T, K, H]` of x `[B, T, DM]`: qk-norm, then RoPE (unchecked)."""
  q = _project(x, params["wq"], params.get("bq"))
  k = _project(x, params["wk"], params.get("bk"))
  v = _project(x, params["wv"], params.get("bv"))
  if "q_norm" in params:  # Per head, over H.
    q = _rms_norm(q, params["q_norm"], options.qk_norm_eps, axes=(-1,))
    k = _rms_norm(k, params["k_norm"], options.qk_norm_eps, axes=(-1,))
  elif "q_norm_proj" in params:  # Over the whole projection, heads and H.
    q = _rms_norm(q, params["q_norm_proj"], options.qk_norm_eps, axes=(-2, -1))
    k = _rms_norm(k, params["k_norm_proj"], options.qk_norm_eps, axes=(-2, -1))
  if options.rope_base is not None:
    q = rope.rotate(q, positions, options.rope_base, options.rope_scaling, options.rotary_dim)
    k = rope.rotate(k, positions, options.rope_base, options.rope_scaling, options.rotary_dim)
  return q, k, v


def _rms_norm(x, scale, eps, axes):
  """RMSNorm of x `[B, T, heads, H]` over `axes`, in float32, times scale; in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
  return (y * scale).astype(x.dtype)


def project_out(params: Params, o: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
  """The output projection of o `[B, T, N, H]` -> `[B, T, DM]` in dtype, zeros at padding."""
  out = jnp.einsum("BTNH,NHD->BTD", o, params["wo"], preferred_element_type=jnp.float32)
  if "bo" in params:
    out = out + params["bo"][None, None].astype(jnp.float32)
  if mask is not None:
    out = jnp.where(mask[:, :, None], out, 0)
  return out.astype(dtype)


def decode_step(
    params: Params,
    cache: KVCache,
    x: jax.Array,
    *,
    rope_base: float | None = None,
    rope_scaling: rope.Scaling | None = None,
    implementation: str | None = None,
    rotary_dim: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    qk_norm_eps: float = 1e-6,
) -> tuple[jax.Array, KVCache]:
  """Appends one token per row and attends over everything cached.

  Args:
    params: attention params.
    cache: the `KVCache` to read and append to.
    x: `[B, 1, DM]` inputs, one real token per row.
    rope_base: as in `prefill`.
    rope_scaling: as in `prefill`.
    implementation: as in `prefill`.
    rotary_dim, scale, softcap, qk_norm_eps: as in `prefill`.

  Returns:
    `(out [B, 1, DM], new_cache)`.
  """
  options = Options(rope_base, rope_scaling, rotary_dim, scale, softcap, qk_norm_eps)
  _check(params, cache, x, None, False, options, implementation, decode=True)
  return _prefill(params, cache, x, None, prefix_lm=False, options=options,
                  implementation=implementation)


def _check(params, cache, x, mask, prefix_lm, options: Options, implementation,
           decode=False) -> None:
  """The checks of `prefill` and `decode_step`, once per call."""
  check_cache(cache, views=True)
  b, kh, h = cache.batch_size, cache.num_kv_heads, cache.head_dim
  # The params were made for the model, the cache may be the odd one out: name it.
  wk, wv = (getattr(params.get(name) if isinstance(params, Mapping) else None, "shape", None)
            for name in ("wk", "wv"))
  if wk is not None and len(wk) == 3 and wk == wv and (wk[1], wk[2]) != (kh, h):
    raise ValueError(f"cache (K, H) should be params['wk']'s (DM, K, H)={tuple(wk)} K and H, "
                     f"({wk[1]}, {wk[2]}): but got ({kh}, {h}) (cache.k shape {cache.k.shape})")
  dm, _ = check_params(params, kh, h)
  if decode:
    check_shape("x", x, "(B, 1, DM)", (b, 1, dm))
  else:
    check_shape("x", x, "(B, T, DM)", (b, None, dm))
  check_x_dtype(x)
  t = x.shape[1]
  if t < 1:
    raise ValueError(f"x shape should be (B, T, DM) with T >= 1: but got {x.shape}")
  if t > cache.max_len and not cache.ring:
    raise ValueError(f"x has T={t} new tokens, more than the cache's max_len S={cache.max_len}")
  if mask is not None:
    check_mask(mask, b, t)
  attention.check_options(prefix_lm, implementation)
  attention.check_ring_options(cache, prefix_lm)
  check_options(options, params)


def check_x_dtype(x) -> None:
  """x holds activations: a floating dtype (token ids go through an embedding first)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x dtype should be a floating dtype (activations, not token ids): "
                     f"but got {x.dtype}")


def check_options(options: Options, params) -> None:
  """The layer's settings, against the params' head dimension."""
  h = params["wq"].shape[-1]
  if options.rope_base is not None:
    rope.check_base(options.rope_base)
  rope.check_rotary_dim(options.rotary_dim, h)
  rope.check_scaling(options.rope_scaling, rotary_dim=options.rotary_dim or h)
  for name in ("rope_scaling", "rotary_dim"):
    if getattr(options, name) is not None and options.rope_base is None:
      raise ValueError(f"{name} needs a rope_base: but got rope_base=None and "
                       f"{name}={getattr(options, name)!r}")
  attention.check_logits(options.scale, options.softcap)
  if not (is_real(options.qk_norm_eps) and options.qk_norm_eps > 0):
    raise ValueError(f"qk_norm_eps should be a positive float: but got {options.qk_norm_eps!r}")


def _project(x, w, bias):
  """x [B, T, DM] @ w [DM, heads, H] (+ bias [heads, H]) -> [B, T, heads, H] in x's dtype.

  Accumulated in float32 whatever the operands: XLA:CPU multiplies bfloat16
  operands natively only so (else it converts the whole weight to float32 on
  every call).
  """
  y = jnp.einsum("BTD,DXH->BTXH", x, w, preferred_element_type=jnp.float32)  # X: N or K heads.
  y = y if bias is None else y + bias[None, None].astype(jnp.float32)
  return y.astype(jnp.result_type(x, w))
