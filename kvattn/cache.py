"""The key/value cache: an immutable pytree of arrays.

Shape legend:
  B: batch size
  S: cache capacity (max_len)
  K: number of key/value heads
  H: head dimension
  T: number of new tokens in one call
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import layout
from kvattn import masks
from kvattn import quant
from kvattn._checks import check_mask, check_positive_ints, is_int


class KVCache(NamedTuple):
  """Keys and values written so far, with the bookkeeping a ragged batch needs.

  Every leaf is an array, so the cache passes through `jax.jit`, `lax.scan`,
  `vmap` and buffer donation. A ring's `window` and `max_positions` are
  static ints, part of the pytree's structure (not leaves): settings that code
  paths and checks depend on, known under jit too. It is never mutated: functions return a new one,
  and `cache._replace(...)` builds a modified copy.

  Slots are shared by the batch: slot `j` of every row was written by the same
  call. A row's padding tokens occupy slots too, marked False in `valid`, so
  they are never attended to.

  Fields:
    k: [B, S, K, H] cached keys (after RoPE, when RoPE is used).
    v: [B, S, K, H] cached values.
    valid: [B, S] bool, True where a slot holds a real token of that row.
    lengths: [B] int32, real tokens cached per row (the position the row's
      next real token will have).
    index: [] int32, slots written so far (shared by the batch).
    overflow: [] bool, sticky: True once a write did not fit.
    k_scale: [B, S, K] float32 scale of each int8 key vector, or None when k
      is stored unquantised (see `kvattn.quant`).
    v_scale: [B, S, K] float32 scale of each int8 value vector, or None.
    positions: [B, S] int32, a ring cache's position of the token in each
      slot; None for a linear cache. In a ring (`init_cache(..., window=W)`)
      S is the number of ring slots, a real token at position p lives in slot
      p % S of its row, and padding takes no slot.
    window: static int, a ring cache's W: a token at position p sees the real
      tokens of its row at positions p - W + 1 .. p. None for a linear cache.
    max_positions: static int, a ring cache's bound on positions (its
      max_len): a write past it sets `overflow`. None for a linear cache.
    layer: None, except in a layer view (`layer_view`): an int32 scalar, and
      every other leaf then has a leading L axis (a stack of L layers'
      caches) of which this cache is layer `layer`. Attention reads and
      writes that layer's slots of the stack in place.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  lengths: jax.Array
  index: jax.Array
  overflow: jax.Array
  # Last and optional, so code that builds a KVCache from six fields still works.
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None
  positions: jax.Array | None = None
  window: jax.Array | None = None
  max_positions: jax.Array | None = None
  layer: jax.Array | None = None

  # Sizes from the last four axes of k, so that a layer view reads as one layer.
  @property
  def batch_size(self) -> int:
    return self.k.shape[-4]

  @property
  def max_len(self) -> int:
    """S, the slots per row (`num_slots`); a ring's positions are bounded by `max_positions`."""
    return self.k.shape[-3]

  @property
  def num_slots(self) -> int:
    """S, the slots per row: max_len for a linear cache, W + rewind_room for a ring."""
    return self.k.shape[-3]

  @property
  def ring(self) -> bool:
    """True for a sliding-window ring cache (`init_cache(..., window=W)`)."""
    return self.positions is not None

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[-2]

  @property
  def head_dim(self) -> int:
    return self.k.shape[-1]

  @property
  def quantized(self) -> bool:
    """True when k and v are int8 with per-token, per-head scales."""
    return self.k_scale is not None


def init_cache(
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    quantized: bool = False,
    window: int | None = None,
    rewind_room: int = 0,
) -> KVCache:
  """Returns an empty cache with room for `max_len` tokens per row.

  Args:
    batch: B, the number of sequences decoded together.
    max_len: S, the capacity in tokens (prompt plus generated tokens).
    num_kv_heads: K.
    head_dim: H.
    dtype: storage dtype of k and v (e.g. jnp.bfloat16). Attention itself is
      always computed in float32.
    quantized: store k and v as int8 with a float32 scale per token and kv
      head (`k_scale`, `v_scale` `[B, S, K]`): about a quarter of the bytes of
      float32 for H >= 32. Each entry is stored within half a step, max|x| /
      254 of its vector (`kvattn.quant`); the layer's output stays within 1e-2
      of float32's (relative norm). `dtype` must then stay float32, the dtype
      the int8 entries are dequantised to.
    window: None for a linear cache of S = max_len slots. W for a
      sliding-window ring: each token sees the real tokens of its own row at
      positions p - W + 1 .. p, and k and v hold only S = W + rewind_room
      slots per row (at most max_len), written round-robin (a real token at
      position p in slot p % S), so memory does not grow with the sequence;
      max_len still bounds the positions (past it, `overflow`).
    rewind_room: ring caches only: extra slots, so that `kvattn.rewind` can
      drop up to rewind_room + 1 tokens and still hold every token the next
      one must see (speculative decoding with k drafts needs k - 1).

  Returns:
    A `KVCache` with k, v `[B, S, K, H]` of zeros, nothing valid, index 0.
  """
  check_positive_ints(batch=batch, max_len=max_len, num_kv_heads=num_kv_heads, head_dim=head_dim)
  if not isinstance(quantized, bool):
    raise ValueError(f"quantized should be a bool: but got {quantized!r}")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype should be a floating dtype: but got {dtype}")
  if quantized and dtype != jnp.float32:
    raise ValueError(f"dtype should be float32 when quantized=True (k and v are stored as int8 "
                     f"and dequantised to float32): but got {dtype}")
  if window is not None:
    check_positive_ints(window=window)
  if not (is_int(rewind_room) and rewind_room >= 0):
    raise ValueError(f"rewind_room should be a non-negative int: but got {rewind_room!r}")
  if rewind_room and window is None:
    raise ValueError(f"rewind_room should be 0 without a window: but got {rewind_room}")
  # A ring of max_len slots never wraps: more would be memory never used.
  slots = max_len if window is None else min(window + rewind_room, max_len)
  sizes = dict(B=batch, S=slots, K=num_kv_heads, H=head_dim)
  storage = jnp.dtype(jnp.int8) if quantized else dtype
  features = {"int8": quantized, "window": window is not None}
  # One array per leaf, never one twice: each must be donatable on its own.
  cache = KVCache(
      **{
          name: None if field.optional and not features[field.feature] else jnp.zeros(
              field.shape(sizes), field.dtype or storage) for name, field in layout.CACHE.items()
      })
  if window is None:
    return cache
  return cache._replace(window=int(window), max_positions=int(max_len))


def overflowed(cache: Any) -> jax.Array:
  """Returns a bool scalar array: True once any write did not fit the cache.

  A write that would pass `max_len` cannot raise under `jit` (the index is a
  traced value), so it writes nothing, keeps every cached entry and sets this
  sticky flag instead. Check it after generation, outside `jit`. `cache` may
  be one `KVCache` or any pytree of them (a model's stacked caches, a tuple
  of stacks): True when any of them, any layer, overflowed.
  """
  flags = [jnp.any(c.overflow) for c in jax.tree.leaves(cache, is_leaf=_is_cache) if _is_cache(c)]
  if not flags or len(flags) != len(jax.tree.leaves(cache, is_leaf=_is_cache)):
    raise TypeError(f"cache should be a KVCache or a pytree of them: but got "
                    f"{type(cache).__name__}")
  return functools.reduce(jnp.logical_or, flags)


def _is_cache(x) -> bool:
  return isinstance(x, KVCache)


_LEAVES = tuple(name for name in KVCache._fields if name not in layout.CACHE_STATIC)


def _flatten(cache: KVCache):
  children = tuple((jax.tree_util.GetAttrKey(name), getattr(cache, name)) for name in _LEAVES)
  return children, (cache.window, cache.max_positions)


def _unflatten(static, children) -> KVCache:
  window, max_positions = static
  return KVCache(**dict(zip(_LEAVES, children)), window=window, max_positions=max_positions)


# A NamedTuple (positional and keyword construction, `_replace`) whose static
# fields are the treedef's, not leaves.
jax.tree_util.register_pytree_with_keys(KVCache, _flatten, _unflatten)


def token_positions(cache: KVCache, mask: jax.Array | None = None,
                    num_tokens: int | None = None) -> jax.Array:
  """Returns int32 `[B, T]`: each new token's position in its own sequence.

  The position of a token is the number of real tokens before it in its row
  (those cached plus those earlier in this call), so left padding does not
  shift positions. A padding token gets the position the next real token will
  have. Use these for learned position embeddings and RoPE.

  Args:
    cache: the cache the tokens will be written to.
    mask: bool `[B, T]`, True for real tokens; None means all real, and then
      `num_tokens` gives T (default 1, a decode step).
    num_tokens: T when `mask` is None.
  """
  if mask is None:
    t = 1 if num_tokens is None else num_tokens
    mask = jnp.ones((cache.batch_size, t), jnp.bool_)
  else:
    check_mask(mask, cache.batch_size, None)
  return leaf(cache, "lengths")[:, None] + masks.real_before(mask)


def layer_view(stack: KVCache, layer: int | jax.Array) -> KVCache:
  """Layer `layer` of a stack of caches, as a cache that updates the stack in place.

  `stack` is a `KVCache` whose leaves have a leading L axis (one layer's
  cache per entry, e.g. `kvattn.models.transformer.init_caches`). The view
  goes wherever a cache does in `prefill`, `decode_step` and
  `cached_attention`: they read that layer's slots of the stacked buffers
  and write its new tokens into them, so a layer loop that carries the stack
  (`kvattn.scan_layers`) costs what one layer's reads and writes cost, never
  a copy of the stack. `stack_of` turns the returned view back into the
  stack. The cache edits (`kvattn.rewind`, `kvattn.reorder`) take whole
  stacks or single caches, not views.

  Args:
    stack: a `KVCache` with leaves `[L, ...]` and no layer set.
    layer: int32 scalar in [0, L), may be traced.
  """
  if not isinstance(stack, KVCache) or stack.layer is not None:
    raise TypeError(f"stack should be a KVCache stack (not a layer view): but got "
                    f"{type(stack).__name__}" +
                    ("" if not isinstance(stack, KVCache) else f" with layer={stack.layer!r}"))
  if getattr(stack.k, "ndim", 0) != 5:
    raise ValueError(f"stack.k shape should be (L, B, S, K, H): but got "
                     f"{getattr(stack.k, 'shape', None)}")
  return stack._replace(layer=jnp.asarray(layer, jnp.int32))


def stack_of(view: KVCache) -> KVCache:
  """The stack a layer view was made from (with the view's writes): `layer` unset."""
  return view._replace(layer=None)


def leaf(cache: KVCache, name: str) -> jax.Array | None:
  """The cache's leaf `name`; in a layer view, that layer's entry of the stacked leaf.

  For bookkeeping leaves (lengths, index, overflow, window, max_positions):
  reading a slot leaf whole from a view would copy the layer's slots; read
  those block by block with `read_slots`.
  """
  x = getattr(cache, name)
  if x is None or cache.layer is None or name in layout.CACHE_STATIC:
    return x
  return lax.dynamic_index_in_dim(x, cache.layer, 0, keepdims=False)


def read_slots(x: jax.Array, start: jax.Array, size: int,
               layer: jax.Array | None = None) -> jax.Array:
  """Slots [start, start + size) of a slot leaf `[B, S, ...]` (`[L, B, S, ...]` at `layer`).

  Per-axis slices keep every other axis whole, so a leaf sharded over B or K
  stays sharded.
  """
  if layer is None:
    return lax.dynamic_slice_in_dim(x, start, size, axis=1)
  zero = jnp.zeros((), jnp.int32)
  starts = (layer, zero, start) + (zero,) * (x.ndim - 3)
  return lax.dynamic_slice(x, starts, (1, x.shape[1], size) + x.shape[3:])[0]


def layer_cache(cache: KVCache) -> KVCache:
  """A plain cache of the view's layer: a copy of its slots (O(S)); the cache itself otherwise.

  For implementations that cannot read a stack in place (Pallas kernels).
  """
  if cache.layer is None:
    return cache
  return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, cache.layer, 0, keepdims=False),
                      cache._replace(layer=None))


def _set(cache: KVCache, **values) -> dict:
  """Replacements of bookkeeping leaves by `values` (the view's layer's entry in a view)."""
  if cache.layer is None:
    return values
  return {name: getattr(cache, name).at[cache.layer].set(x) for name, x in values.items()}


def append(cache: KVCache, k: jax.Array, v: jax.Array,
           mask: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
  """Writes T new tokens at `cache.index`, or nothing at all if they do not fit.

  (A ring cache writes each real token at slot `position % S` of its row
  instead; see `_append_ring`.)

  The one place where a cache is written. It does not validate its arguments:
  `kvattn.cached_attention` checks them once, then calls it.

  Keys and values are first cast to the cache's dtype (quantised, for an int8
  cache), and padding tokens are stored as zeros. The returned copies are
  what attention must use for the new tokens, so that attending to them now
  gives the same numbers as attending to them from the cache later.

  XLA's dynamic_update_slice clamps an out-of-range start, which would
  silently overwrite the newest entries. So the start is clamped here
  explicitly and, when the write does not fit (or the cache has overflowed
  before), the slots already there are written back unchanged and the sticky
  `overflow` flag is set. The cost is O(T), never O(S).

  Args:
    cache: the cache to append to.
    k, v: `[B, T, K, H]` new keys and values (after RoPE, if used).
    mask: bool `[B, T]`, True for real tokens.

  Returns:
    `(new_cache, k_new, v_new)`: k_new and v_new `[B, T, K, H]` in the
    cache's dtype, or float32 (dequantised) for an int8 cache.
  """
  if cache.ring:
    return _append_ring(cache, k, v, mask)
  stored, k, v = _storage(cache, k, v, mask)
  t = mask.shape[1]
  s = cache.max_len
  index, overflow = leaf(cache, "index"), leaf(cache, "overflow")
  fits = (index <= s - t) & ~overflow
  start = jnp.clip(index, 0, s - t)
  written = jnp.sum(mask, axis=1, dtype=jnp.int32)
  lead = () if cache.layer is None else (cache.layer,)
  new_cache = cache._replace(
      **{
          name: _put(getattr(cache, name), x, start, fits, lead) for name, x in stored.items()
      },
      valid=_put(cache.valid, mask, start, fits, lead),
      **_set(cache, lengths=leaf(cache, "lengths") + jnp.where(fits, written, 0),
             index=jnp.where(fits, index + t, index), overflow=overflow | ~fits),
  )
  return new_cache, k, v


def as_stored(cache: KVCache, k: jax.Array, v: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """k, v `[B, T, K, H]` as `append` returns them (as attention must read them), unwritten."""
  _, k, v = _storage(cache, k, v, mask)
  return k, v


def _storage(cache: KVCache, k, v, mask):
  """The leaves to store for k, v `[B, T, K, H]`, and k, v as attention must read them.

  Padding is stored as zeros, so that whatever it held (NaN, inf) stays out
  of every later read.
  """
  real = mask[:, :, None, None]
  k, v = jnp.where(real, k, jnp.zeros_like(k)), jnp.where(real, v, jnp.zeros_like(v))
  if cache.quantized:
    (kq, k_scale), (vq, v_scale) = quant.quantize(k), quant.quantize(v)
    stored = dict(k=kq, v=vq, k_scale=k_scale, v_scale=v_scale)
    return stored, quant.dequantize(kq, k_scale), quant.dequantize(vq, v_scale)
  k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
  return dict(k=k, v=v), k, v


def _append_ring(cache: KVCache, k, v, mask):
  """`append` for a ring cache: each real token goes to slot `position % S` of its row.

  Only the newest S real tokens of a row can be held, so earlier ones of a
  long chunk are not written (no two writes of one call hit the same slot).
  Padding takes no slot. `index` counts the tokens of every call, as in a
  linear cache; the write fails (nothing written, `overflow` set) when a
  row's positions would pass `max_positions`.
  """
  stored, k, v = _storage(cache, k, v, mask)
  b, t = mask.shape
  s = cache.max_len
  old_lengths, index, overflow = (leaf(cache, n) for n in ("lengths", "index", "overflow"))
  position = old_lengths[:, None] + masks.real_before(mask)  # [B, T]
  lengths = old_lengths + jnp.sum(mask, axis=1, dtype=jnp.int32)
  fits = jnp.all(lengths <= leaf(cache, "max_positions")) & ~overflow
  keep = mask & (position >= lengths[:, None] - s) & fits
  slot = position % s
  lead = () if cache.layer is None else (cache.layer,)  # A view: into its layer of the stack.
  put = lambda buf, x: _ring_put(buf, x, slot, keep, lead)
  return cache._replace(
      **{
          name: put(getattr(cache, name), x) for name, x in stored.items()
      },
      valid=put(cache.valid, mask),
      positions=put(cache.positions, position),
      **_set(cache, lengths=jnp.where(fits, lengths, old_lengths),
             index=jnp.where(fits, index + t, index), overflow=overflow | ~fits),
  ), k, v


def _ring_put(buf, x, slot, keep, lead):
  """`buf` with each kept token of x `[B, T, ...]` written at slot `slot [B, T]` of its row.

  A scatter; for a bfloat16 buffer on XLA:CPU and a few tokens (a decode
  step), in-place writes of its bits (`_ring_scatter_bits`).
  """
  if buf.dtype == jnp.bfloat16 and slot.size <= _RING_LOOP_WRITES:
    return lax.platform_dependent(buf, x, slot, keep, lead, cpu=_ring_scatter_bits,
                                  default=_ring_scatter)
  return _ring_scatter(buf, x, slot, keep, lead)


# Up to this many tokens (B * T), a bfloat16 ring on XLA:CPU is written one
# token at a time, in place (about 13 us a token); past it, by a scatter,
# which XLA:CPU runs on a copy of the ring (one O(S) pass, amortised over the
# many tokens of a long chunk).
_RING_LOOP_WRITES = 64


def _ring_scatter(buf, x, slot, keep, lead):
  b, t = slot.shape
  row = lax.broadcasted_iota(jnp.int32, (b, t), 0)
  where = tuple(lead) + (row, jnp.where(keep, slot, buf.shape[len(lead) + 1]))
  return buf.at[where].set(x.astype(buf.dtype), mode="drop")  # Slot S: dropped.


@jax.custom_jvp
def _ring_scatter_bits(buf, x, slot, keep, lead):
  """`_ring_scatter` for a bfloat16 buffer on XLA:CPU: one in-place write per kept token.

  XLA:CPU would convert the whole buffer to float32 and back around a
  bfloat16 scatter, and copies it around a scatter of its uint16 bits; a
  dynamic-update-slice of the bits under a conditional stays in place (as in
  `_put_bits_if`). B * T writes in a loop: one per row in a decode step.
  """
  b, t = slot.shape
  x = x.astype(buf.dtype)
  zero = jnp.zeros((), jnp.int32)

  def body(i, buf):
    r, j = i // t, i % t
    token = lax.dynamic_slice(x, (r, j) + (zero,) * (x.ndim - 2), (1, 1) + x.shape[2:])
    token = token.reshape((1,) * len(lead) + token.shape)
    starts = tuple(lead) + (r, slot[r, j]) + (zero,) * (x.ndim - 2)

    def write(buf):
      bits = lax.bitcast_convert_type(buf, jnp.uint16)
      new = lax.bitcast_convert_type(token, jnp.uint16)
      return lax.bitcast_convert_type(lax.dynamic_update_slice(bits, new, starts), buf.dtype)

    return lax.cond(keep[r, j], write, lambda buf: buf, buf)

  return lax.fori_loop(0, b * t, body, buf)


@_ring_scatter_bits.defjvp
def _ring_scatter_bits_jvp(primals, tangents):
  """Bits carry no derivative: tangents are written by the same rule, as values."""
  buf, x, slot, keep, lead = primals
  dbuf, dx = tangents[:2]
  return _ring_scatter_bits(*primals), _ring_scatter(dbuf, dx, slot, keep, lead)


def _put(buf: jax.Array, x: jax.Array, start: jax.Array, fits: jax.Array,
         lead: tuple = ()) -> jax.Array:
  """`buf` with `x` written along the slot axis at `start` if `fits`, else `buf` unchanged.

  `lead`: () for a cache's own leaf `[B, S, ...]`; `(layer,)` for a stacked
  leaf `[L, B, S, ...]`, written at that layer (x keeps its `[B, T, ...]`).
  """
  if buf.dtype == jnp.bfloat16:
    return lax.platform_dependent(buf, x, start, fits, lead, cpu=_put_bits_if, default=_put_select)
  return _put_select(buf, x, start, fits, lead)


def _starts(buf, start, lead):
  """The start indices of a slot write: the leading (layer) indices, row 0, slot `start`."""
  zero = jnp.zeros((), jnp.int32)
  rest = (zero,) * (buf.ndim - len(lead) - 2)
  return tuple(lead) + (zero, start) + rest


def _put_select(buf, x, start, fits, lead=()):
  """Writes `x` where it fits, else the slots' own old contents: in place, O(T)."""
  x = x.reshape((1,) * len(lead) + x.shape)
  starts = _starts(buf, start, lead)
  old = lax.dynamic_slice(buf, starts, x.shape)
  new = jnp.where(fits.reshape((1,) * x.ndim), x.astype(buf.dtype), old)
  return lax.dynamic_update_slice(buf, new, starts)


@jax.custom_jvp
def _put_bits_if(buf, x, start, fits, lead=()):
  """`_put_select` for a bfloat16 buffer on XLA:CPU, by a `lax.cond` on the uint16 bits.

  XLA:CPU computes bfloat16 in float32: it rewrites a bfloat16
  dynamic-update-slice as a conversion of the whole buffer to float32 and
  back, an O(S) pass (and temporary) on every call. Written as uint16 bits it
  stays in place, but only while nothing else in the same computation reads
  the buffer, which rules out reading the old slots back: a conditional
  writes or keeps it instead (on CPU a conditional costs nothing much; on GPU
  it would cost a host round trip, hence the select elsewhere).
  """
  def write(buf):
    bits = lax.bitcast_convert_type(buf, jnp.uint16)
    new = lax.bitcast_convert_type(x.astype(buf.dtype), jnp.uint16)
    new = new.reshape((1,) * len(lead) + new.shape)
    bits = lax.dynamic_update_slice(bits, new, _starts(buf, start, lead))
    return lax.bitcast_convert_type(bits, buf.dtype)

  return lax.cond(fits, write, lambda buf: buf, buf)


@_put_bits_if.defjvp
def _put_bits_if_jvp(primals, tangents):
  """Bits carry no derivative: tangents are written by the same rule, as values."""
  buf, x, start, fits, lead = primals
  dbuf, dx, _, _, _ = tangents
  return _put_bits_if(buf, x, start, fits, lead), _put_select(dbuf, dx, start, fits, lead)
