"""Attention of new tokens over a key/value cache: the public kernel call.

This is the kernel level: callers bring their own projected queries, keys and
values. `kvattn.prefill` and `kvattn.decode_step` are projections around it.

`cached_attention` validates its arguments once, writes the new tokens
(`kvattn.cache.append`), and hands the attention itself to one of the
implementations in `kvattn.kernels`, which share one signature:

  * "xla": blockwise attention in plain XLA with an online softmax; the
    default on every platform, and the fallback everywhere.
  * "pallas_gpu": flash-decoding and flash attention as Pallas kernels,
    compiled on CUDA and interpreted elsewhere (slowly: for tests). Not yet
    the default on GPU: it has only run in interpret mode so far.

A ring (sliding-window) cache is read before the write by the
implementation's `attend_ring` (`RING_IMPLEMENTATIONS`), since a long chunk
overwrites slots its own first tokens must still see.

The implementation is picked for the platform the computation is compiled
for (`lax.platform_dependent`), or named with `implementation=`, as in
`jax.nn.dot_product_attention`.

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn import cache as cache_lib
from kvattn._checks import check_cache, check_heads, check_mask, check_positive_ints
from kvattn._checks import check_shape, is_concrete
from kvattn.cache import KVCache
from kvattn.kernels import pallas_gpu
from kvattn.kernels import xla

IMPLEMENTATIONS = {"xla": xla.attend, "pallas_gpu": pallas_gpu.attend}
# The same implementations for ring (sliding-window) caches: the new tokens
# over the ring as it was before the write, and themselves.
RING_IMPLEMENTATIONS = {"xla": xla.attend_ring, "pallas_gpu": pallas_gpu.attend_ring}

# The implementation a platform ("cpu", "cuda", "rocm", "tpu") gets when none is
# named; every other platform gets "xla". Empty for now: "pallas_gpu" becomes
# CUDA's default once it has been compiled and timed on a GPU.
DEFAULTS: dict[str, str] = {}


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    mask: jax.Array | None = None,
    *,
    prefix_lm: bool | jax.Array = False,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> tuple[jax.Array, KVCache]:
  """Attends T new tokens over the cache and themselves, then caches them.

  Each new query sees every valid cached slot, and the new keys causally
  (bidirectionally with `prefix_lm`), skipping padding. Queries that are
  padding see nothing and give zeros. Logits and softmax are float32 whatever
  the storage dtype; scale is 1/sqrt(H). Query head n uses kv head n // G.

  The new keys and values are first cast to the cache's dtype (quantised and
  dequantised for an int8 cache), so attending to them now gives the same
  numbers as attending to them from the cache later.

  If the write would pass max_len (or the cache has already overflowed), the
  output is still computed, but nothing is written, the index stays, and the
  sticky `overflow` flag is set: cached entries are never overwritten.

  Args:
    q: `[B, T, N, H]` queries (after RoPE, if used), T >= 1.
    k: `[B, T, K, H]` new keys (after RoPE, if used).
    v: `[B, T, K, H]` new values.
    cache: the `KVCache` to read and append to.
    mask: bool `[B, T]`, True for real tokens, False for padding (left or
      right); None means all real.
    prefix_lm: if True, the T new tokens see each other bidirectionally. A
      Python bool or a traced bool scalar (then both variants are compiled
      and one `lax.cond` picks).
    implementation: None (the platform's default), or a name from
      `IMPLEMENTATIONS`: "xla" or "pallas_gpu".
    block_q: queries per block of the new chunk; None for the
      implementation's default.
    block_kv: keys per block (cache slots of the cached prefix; "pallas_gpu"
      also blocks the new chunk's keys with it); None for the default.
      Neither block size changes the result beyond float32 rounding.

  Returns:
    `(o, new_cache)`: o `[B, T, N, H]` in q's dtype, and the updated cache.
  """
  check_cache(cache, views=True)
  mask = check_qkv(q, k, v, cache, mask)
  check_options(prefix_lm, implementation, block_q=block_q, block_kv=block_kv)
  check_ring_options(cache, prefix_lm)
  return attend(q, k, v, cache, mask, prefix_lm=prefix_lm, implementation=implementation,
                block_q=block_q, block_kv=block_kv)


def check_qkv(q, k, v, cache: KVCache, mask) -> jax.Array:
  """Checks q, k, v and mask against a checked cache; returns the mask (all True for None)."""
  b, s, kh, h = cache.batch_size, cache.max_len, cache.num_kv_heads, cache.head_dim
  check_shape("q", q, "(B, T, N, H)", (b, None, None, h))
  _, t, n, _ = q.shape
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} dtype should be a floating dtype: but got {x.dtype}")
  check_shape("k", k, "(B, T, K, H)", (b, t, kh, h))
  check_shape("v", v, "(B, T, K, H)", (b, t, kh, h))
  if t < 1:
    raise ValueError(f"q shape should be (B, T, N, H) with T >= 1: but got {q.shape}")
  check_heads(n, kh)
  if t > s and not cache.ring:
    raise ValueError(f"q has T={t} new tokens, more than the cache's max_len S={s}")
  if mask is None:
    return jnp.ones((b, t), jnp.bool_)
  check_mask(mask, b, t)
  return mask


def check_options(prefix_lm, implementation, **blocks) -> None:
  """Checks prefix_lm (a bool, or a bool scalar array), implementation and block sizes."""
  if not isinstance(prefix_lm, (bool, np.bool_)):
    if getattr(prefix_lm, "shape", None) != () or getattr(prefix_lm, "dtype", None) != jnp.bool_:
      raise TypeError(f"prefix_lm should be a bool or a bool scalar array: but got "
                      f"{prefix_lm!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation should be None or one of {sorted(IMPLEMENTATIONS)}: "
        f"but got {implementation!r}")
  check_positive_ints(**{name: size for name, size in blocks.items() if size is not None})


def check_ring_options(cache: KVCache, prefix_lm) -> None:
  """A ring cache is causal: prefix_lm must be False."""
  if not cache.ring:
    return
  if not is_concrete(prefix_lm) or bool(prefix_lm):
    raise ValueError(f"prefix_lm should be False with a ring (sliding-window) cache: but got "
                     f"{prefix_lm!r}")


def attend(q, k, v, cache: KVCache, mask, *, prefix_lm, implementation=None, block_q=None,
           block_kv=None) -> tuple[jax.Array, KVCache]:
  """`cached_attention` without the checks, for callers that made them (`kvattn.prefill`)."""
  if cache.ring:  # Read the ring before the write: a long chunk overwrites what it needs.
    positions = cache_lib.token_positions(cache, mask)
    k_new, v_new = cache_lib.as_stored(cache, k, v, mask)
    o, cache = _implementation(implementation, q, k_new, v_new, cache, positions, mask,
                               table=RING_IMPLEMENTATIONS, block_q=block_q, block_kv=block_kv)
    # Written into the cache the reads returned: for a bfloat16 ring on CPU
    # XLA then copies about half the bytes it copies otherwise (measured).
    # as_stored and append both compute the stored k, v (O(T); XLA merges them).
    cache, _, _ = cache_lib.append(cache, k, v, mask)
    return o, cache
  start = cache_lib.leaf(cache, "index")
  cache, k_new, v_new = cache_lib.append(cache, k, v, mask)
  call = functools.partial(_implementation, implementation, q, k_new, v_new, cache, start, mask,
                           block_q=block_q, block_kv=block_kv)
  if isinstance(prefix_lm, (bool, np.bool_)):
    return call(prefix_lm=bool(prefix_lm))
  return lax.cond(prefix_lm, lambda: call(prefix_lm=True), lambda: call(prefix_lm=False))


def _implementation(name, *args, table=IMPLEMENTATIONS, **kwargs):
  """Calls the named implementation, or the default of the platform it is compiled for."""
  if name is not None:
    return table[name](*args, **kwargs)
  default = functools.partial(table["xla"], **kwargs)
  if not DEFAULTS:
    return default(*args)
  branches = {platform: functools.partial(table[impl], **kwargs)
              for platform, impl in DEFAULTS.items()}
  return lax.platform_dependent(*args, default=default, **branches)
