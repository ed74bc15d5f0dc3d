"""The attention ops: new tokens over a key/value cache, and a sequence over itself.

This is the kernel level: callers bring their own projected queries, keys and
values (`kvattn.prefill`, `kvattn.decode_step` and `kvattn.self_attention`
are the projections around it, in `kvattn.layer`).

  * `cached_attention` validates its arguments once, writes the new tokens
    (`kvattn.cache.append`), and hands the attention itself to a backend.
  * `dot_product_attention` is attention without a cache, differentiable,
    for training: the same numbers as the cached path.

Backends live in `kvattn.kernels`, one record (`kvattn.kernels.Backend`) per
module, all in `BACKENDS`. This module alone decides which runs and how:

  * `implementation=None`: the platform's default (`DEFAULTS`, by lowering
    platform), falling back to "xla" where the default cannot take the
    shapes; "xla" on every platform without a default (all of them today).
  * a named backend runs compiled on the platforms it compiles for and
    interpreted on those it interprets on ("pallas_gpu": compiled for CUDA,
    interpreted on CPU, for tests); anywhere else, or with shapes its
    compiled kernel cannot take, it raises a ValueError saying why.

The choice is per lowering platform (`lax.platform_dependent`), so a
function exported for several platforms gets each one's kernel; the error
for a named backend is raised when tracing for the platform of jax's default
device, and by the lowering for any other platform it cannot run on.

A ring (sliding-window) cache is read before the write by the backend's
`attend_ring`, since a long chunk overwrites slots its own first tokens must
still see.

Shape legend:
  B: batch size
  T: number of new tokens in this call (the sequence length, without a cache)
  S: cache slots (`KVCache.num_slots`)
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
from kvattn._checks import check_shape, is_concrete, is_real
from kvattn.cache import KVCache
from kvattn.kernels import Backend
from kvattn.kernels import pallas_gpu
from kvattn.kernels import xla
from kvattn.kernels import xla_training

# Every backend, by its `implementation=` name.
BACKENDS: dict[str, Backend] = {b.name: b for b in (xla.BACKEND, pallas_gpu.BACKEND)}

# The backend a lowering platform ("cpu", "cuda", "rocm", "tpu") gets when
# none is named; every other platform gets "xla". Empty for now: "pallas_gpu"
# becomes CUDA's default once it has been compiled and timed on a GPU.
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
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, KVCache]:
  """Attends T new tokens over the cache and themselves, then caches them.

  Each new query sees every valid cached slot, and the new keys causally
  (bidirectionally with `prefix_lm`), skipping padding. Queries that are
  padding see nothing and give zeros. Logits and softmax are float32 whatever
  the storage dtype; scale is 1/sqrt(H) unless given. Query head n uses kv
  head n // G.

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
      `BACKENDS`: "xla" or "pallas_gpu" (see the module docstring for where
      each runs; a named backend that cannot run here raises).
    block_q: queries per block of the new chunk; None for the
      implementation's default.
    block_kv: keys per block (cache slots of the cached prefix; "pallas_gpu"
      also blocks the new chunk's keys with it); None for the default.
      Neither block size changes the result beyond float32 rounding.
    scale: the logits' scale, a positive Python float; None for 1/sqrt(H)
      (Gemma 2 and 3 use `query_pre_attn_scalar ** -0.5`).
    softcap: None, or c, a positive Python float: each logit (after scale)
      becomes `c * tanh(logit / c)` before the mask and the softmax (Gemma
      2's attention logit soft-capping).

  Returns:
    `(o, new_cache)`: o `[B, T, N, H]` in q's dtype, and the updated cache.
  """
  check_cache(cache, views=True)
  mask = check_qkv(q, k, v, cache, mask)
  check_options(prefix_lm, implementation, block_q=block_q, block_kv=block_kv)
  check_logits(scale, softcap)
  check_ring_options(cache, prefix_lm)
  return attend(q, k, v, cache, mask, prefix_lm=prefix_lm, implementation=implementation,
                block_q=block_q, block_kv=block_kv, scale=scale, softcap=softcap)


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
      raise ValueError(f"prefix_lm should be a bool or a bool scalar array: but got "
                       f"{prefix_lm!r}")
  if implementation is not None and implementation not in BACKENDS:
    raise ValueError(f"implementation should be None or one of {sorted(BACKENDS)}: "
                     f"but got {implementation!r}")
  check_positive_ints(**{name: size for name, size in blocks.items() if size is not None})


def check_logits(scale, softcap) -> None:
  """scale and softcap: None or a positive, finite Python number (static: they shape the code)."""
  for name, value in (("scale", scale), ("softcap", softcap)):
    if value is not None and not (is_real(value) and 0 < value < float("inf")):
      raise ValueError(f"{name} should be None or a positive Python float: but got {value!r}")


def check_ring_options(cache: KVCache, prefix_lm) -> None:
  """A ring cache is causal: prefix_lm must be False."""
  if not cache.ring:
    return
  if not is_concrete(prefix_lm) or bool(prefix_lm):
    raise ValueError(f"prefix_lm should be False with a ring (sliding-window) cache: but got "
                     f"{prefix_lm!r}")


def attend(q, k, v, cache: KVCache, mask, *, prefix_lm, implementation=None, block_q=None,
           block_kv=None, scale=None, softcap=None) -> tuple[jax.Array, KVCache]:
  """`cached_attention` without the checks, for callers that made them (`kvattn.prefill`)."""
  scale = q.shape[-1]**-0.5 if scale is None else float(scale)
  softcap = None if softcap is None else float(softcap)
  run = functools.partial(_dispatch, implementation, q.shape[-1], cache.num_slots, ring=cache.ring,
                          block_q=block_q, block_kv=block_kv, scale=scale, softcap=softcap)
  if cache.ring:  # Read the ring before the write: a long chunk overwrites what it needs.
    positions = cache_lib.token_positions(cache, mask)
    k_new, v_new = cache_lib.as_stored(cache, k, v, mask)
    o, cache = run(q, k_new, v_new, cache, positions, mask)
    # Written into the cache the reads returned: for a bfloat16 ring on CPU
    # XLA then copies about half the bytes it copies otherwise (measured).
    # as_stored and append both compute the stored k, v (O(T); XLA merges them).
    cache, _, _ = cache_lib.append(cache, k, v, mask)
    return o, cache
  start = cache_lib.leaf(cache, "index")
  cache, k_new, v_new = cache_lib.append(cache, k, v, mask)
  call = functools.partial(run, q, k_new, v_new, cache, start, mask)
  if isinstance(prefix_lm, (bool, np.bool_)):
    return call(prefix_lm=bool(prefix_lm))
  return lax.cond(prefix_lm, lambda: call(prefix_lm=True), lambda: call(prefix_lm=False))


def _dispatch(implementation, head_dim, num_slots, *args, ring, **kwargs):
  """Runs the backend that `implementation` names, per lowering platform; raises where it cannot.

  A named backend gets one branch per platform it compiles for (with
  shapes it takes) or interprets on; `lax.platform_dependent` without a
  default makes lowering for any other platform an error, and the platform of
  jax's default device is checked here, with the reason. With
  `implementation=None`, each platform in `DEFAULTS` gets its backend where
  it takes the shapes, and every other platform "xla".
  """
  def branch(backend: Backend, interpret: bool):
    entry = backend.attend_ring if ring else backend.attend
    return functools.partial(entry, interpret=interpret, **kwargs)

  if implementation is None:
    branches = {
        platform: branch(BACKENDS[name], False) for platform, name in DEFAULTS.items()
        if BACKENDS[name].compiles_on(platform)
        and BACKENDS[name].unsupported(head_dim, num_slots) is None
    }
    if not branches:
      return branch(xla.BACKEND, False)(*args)
    return lax.platform_dependent(*args, default=branch(xla.BACKEND, False), **branches)
  backend = BACKENDS[implementation]
  here = current_platform()
  why = cannot_run(backend, here, head_dim, num_slots)
  if why is not None:
    raise ValueError(f"implementation={implementation!r} cannot run on {here}: {why}")
  if backend.platforms is None:
    return branch(backend, False)(*args)
  branches = {p: branch(backend, True) for p in backend.interpret_platforms}
  if backend.unsupported(head_dim, num_slots) is None:
    branches.update({p: branch(backend, False) for p in backend.platforms})
  return lax.platform_dependent(*args, **branches)


def cannot_run(backend: Backend, platform: str, head_dim: int, num_slots: int) -> str | None:
  """Why `backend` cannot run on `platform` with these shapes when named; None if it can."""
  if backend.compiles_on(platform):
    return backend.unsupported(head_dim, num_slots)
  if platform in backend.interpret_platforms:
    return None
  where = f"it compiles for {', '.join(backend.platforms or ())}"
  if backend.interpret_platforms:
    where += f" and runs interpreted on {', '.join(backend.interpret_platforms)}"
  return where


def current_platform() -> str:
  """The lowering platform of jax's default device: "cpu", "cuda", "rocm" or "tpu"."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return device.platform
  return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
    block_size: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
  """Self-attention of T tokens, with the cached path's numbers and a gradient.

  Each query attends to the real keys at or before its own position (all of
  them with `causal=False`), skipping padding, which may be anywhere. Padded
  queries give zeros. Logits and softmax are float32 whatever the input
  dtype; scale is 1/sqrt(H) unless given. Query head n uses kv head n // G.

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
    scale, softcap: as in `cached_attention` (the gradient goes through the
      cap).

  Returns:
    o `[B, T, N, H]` in q's dtype.
  """
  mask = _check_sequence(q, k, v, mask, causal, block_size)
  check_logits(scale, softcap)
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
  return xla_training.attend_sequence(q, k, v, mask, window, causal, block,
                                      q.shape[-1]**-0.5 if scale is None else float(scale),
                                      None if softcap is None else float(softcap))


def _check_sequence(q, k, v, mask, causal, block_size) -> jax.Array:
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
    raise ValueError(f"causal should be a Python bool: but got {causal!r}")
  if block_size is not None:
    check_positive_ints(block_size=block_size)
  if mask is None:
    return jnp.ones((b, t), jnp.bool_)
  check_mask(mask, b, t)
  return mask
