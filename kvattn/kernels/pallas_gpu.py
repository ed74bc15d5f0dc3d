"""A GPU implementation: flash-decoding and flash attention as Pallas kernels.

On GPU, the XLA implementation's loop over cache blocks has a traced trip
count, and XLA:GPU runs such a loop by copying its predicate to the host and
waiting, once per block. Here every loop runs inside a kernel, on the device:

  * cached prefix: one program per (row, kv head, block of query rows,
    split of the cache); each loops over the blocks of its split that lie
    below the cache index (flash-decoding: with few rows, e.g. a decode step,
    the splits keep the GPU busy). Each K/V block is loaded once for the
    whole GQA group: the query rows of a program are the G heads of each of
    its tokens. int8 blocks are dequantised in the kernel;
  * new chunk: the same kernel over the new keys, causal (query row r is
    token r // G), each program stopping at the key block of its last token;
  * the partial softmaxes of the splits and of the two parts are merged by
    log-sum-exp (`kvattn.online_softmax`) in XLA, then normalised once.

A ring (sliding-window) cache takes the same kernels (`attend_ring`): each
key's token position is compared with each query row's, the ring read up to
its longest row, before this call's write.

Why Pallas with its Triton lowering: it is the one GPU kernel language in JAX
whose kernels also run on CPU (`interpret=True`), so CI checks this module
against the float64 reference on every change. The kernel uses only
`pallas_call`, `BlockSpec`s, ref slicing and `jax.numpy`, nothing
Triton-specific but `CompilerParams`, so moving it to Mosaic GPU (upstream's
successor to the Triton lowering, Hopper and newer) keeps the maths; but each
program reads its whole key axis from a block, which Mosaic GPU would stage
in shared memory, so the key loop has to become a pipeline of copies: a
rewrite, to be checked on a GPU. cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")`) was set aside: it
takes right padding only, while kvattn's masks may have holes anywhere, and
it has no float32 or int8.

The Triton lowering's deprecation (jax 0.11): jax raises a DeprecationWarning
each time it lowers a Pallas kernel for a GPU through Triton. kvattn keeps
the Triton lowering and lets the warning through, unfiltered:

  * it cannot be filtered around this module's `pallas_call`: the warning
    comes when the caller's jitted function is lowered, after `_flash` has
    returned (tracing it raises none), so only a process-wide filter would
    catch it, and that would also hide it for the user's own Triton kernels
    (`warnings.catch_warnings`, too, changes the filters of every thread);
  * it is true: `implementation="pallas_gpu"` depends on a lowering that jax
    will remove. Python's default filters show it only to those who ask for
    warnings (it is attributed to a jax module, not `__main__`): pytest and
    `-W error` users, who want to know;
  * the default implementation and interpret mode (every platform but CUDA,
    and every test that checks numbers) never lower through Triton: no
    warning. tests/kernels_pallas_gpu_test.py expects it where it lowers for
    CUDA and fails on it anywhere else, so that the day jax turns it into an
    error or drops the lowering, CI says so.

Mosaic GPU is the way forward, once a GPU is at hand to check the rewrite.

Precision: bfloat16 and float16 caches are multiplied in their own dtype with
float32 accumulation (queries and probabilities cast to it), as flash
attention does; float32 and int8 caches in float32 (TF32 on NVIDIA GPUs by
default, full float32 under `jax.default_matmul_precision("highest")`, which
the kernel reads at trace time). Softmax statistics are always float32.

Where it runs (its `BACKEND` record; `kvattn.attention` decides): compiled
for CUDA; interpreted on CPU when named (slow, for tests); refused anywhere
else. Shapes the compiled kernel cannot take (`unsupported`: H not a power
of two >= 16, a cache of fewer than 16 slots) are refused when it is named
and left to the XLA backend when it is a platform's default. Compiled, block
sizes become powers of two of at least 16 (Triton's tiles), and a program
takes at most 128 query rows (block_q tokens times G heads).

Status: checked in interpret mode only; not yet compiled or timed on a GPU,
so it is no platform's default (name it with `implementation="pallas_gpu"`).

Shape legend:
  B: batch size
  T: number of new tokens in this call
  S: cache capacity (max_len)
  J: number of keys a kernel call reads (S for the cache, T for the chunk)
  N: number of query heads
  K: number of key/value heads
  G: N // K, query heads per key/value head
  H: head dimension
  R: query rows per kv head, T * G, token-major (row r is token r // G)
  RB: query rows per program
  C: keys per block
  NS: splits of the keys (programs along them)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kvattn.cache import KVCache, layer_cache
from kvattn.kernels import Backend
from kvattn.online_softmax import Partial, accumulate, accumulate_axis, empty, normalize
from kvattn.online_softmax import probabilities

BLOCK_Q = 64  # Query tokens per program of the new chunk (times G rows).
BLOCK_KV = 64  # Keys per block, in both parts.
# Programs to aim for (about two per streaming multiprocessor of an H100 or
# H200): the cache is split until B * K * row blocks * splits reaches it.
_TARGET_PROGRAMS = 264
_MIN_BLOCK = 16  # Triton's smallest matmul tile.
# Query rows per program at most (block_q tokens times G heads, capped): a
# 128 x H float32 tile and its accumulator stay within a program's registers.
_MAX_ROWS = 128


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, start: jax.Array,
           mask: jax.Array, *, prefix_lm: bool, block_q: int | None = None,
           block_kv: int | None = None, scale: float | None = None, softcap: float | None = None,
           interpret: bool = False) -> tuple[jax.Array, KVCache]:
  """Attention of the new tokens over the cached prefix and themselves.

  The signature of every backend (see `kvattn.kernels`).
  """
  # A layer view's slots are copied out of the stack first (O(S)): the kernels
  # read one cache, not a stack.
  o = _attention(q, k_new, v_new, layer_cache(cache), start, mask, causal=not prefix_lm,
                 window=None, positions=None, block_q=block_q, block_kv=block_kv, scale=scale,
                 softcap=softcap, interpret=interpret)
  return o, cache


def attend_ring(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache,
                positions: jax.Array, mask: jax.Array, *, block_q: int | None = None,
                block_kv: int | None = None, scale: float | None = None,
                softcap: float | None = None, interpret: bool = False) -> tuple[jax.Array, KVCache]:
  """`kvattn.kernels.xla.attend_ring` as Pallas kernels: a ring cache, read before its write.

  The same kernels, with each key's token position (the ring's `positions`,
  the chunk's `positions`) compared to each query row's: keys at positions
  <= p - W are masked.
  """
  one = layer_cache(cache)  # A layer view's slots, copied out of the stack (O(S)).
  # Until the ring wraps, slots from the longest row's length on are empty.
  filled = jnp.minimum(jnp.max(one.lengths), one.num_slots)
  o = _attention(q, k_new, v_new, one, filled, mask, causal=True, window=one.window,
                 positions=positions, block_q=block_q, block_kv=block_kv, scale=scale,
                 softcap=softcap, interpret=interpret)
  return o, cache


def unsupported(head_dim: int, num_slots: int) -> str | None:
  """Why the compiled kernel cannot take these shapes; None if it can (interpret takes any)."""
  if head_dim < _MIN_BLOCK or head_dim & (head_dim - 1):
    return f"head dimension H={head_dim} is not a power of two >= {_MIN_BLOCK}"
  if num_slots < _MIN_BLOCK:
    return f"the cache has {num_slots} slots, fewer than {_MIN_BLOCK}"
  return None


BACKEND = Backend("pallas_gpu", attend, attend_ring, platforms=("cuda",),
                  interpret_platforms=("cpu",), unsupported=unsupported)


def _attention(q, k_new, v_new, cache, end, mask, *, causal, window, positions, block_q, block_kv,
               scale, softcap, interpret):
  """o `[B, T, N, H]`: the new queries over cache slots [0, end) and the new keys.

  With `window`, a ring cache: `positions` are the new tokens', the cache's
  are `cache.positions`, and keys at positions <= p - W are masked.
  """
  b, t, n, h = q.shape
  kh = k_new.shape[2]
  g = n // kh
  low = cache.k.dtype in (jnp.bfloat16, jnp.float16)
  dot_dtype = cache.k.dtype if low else jnp.float32
  # Rows grouped by kv head, token-major: [B, K, R, H], pre-scaled.
  scale = h**-0.5 if scale is None else scale
  rows = (q.astype(jnp.float32) * scale).reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)
  rows = rows.reshape(b, kh, t * g, h).astype(dot_dtype)
  row_ok = jnp.repeat(mask, g, axis=1)  # [B, R]
  row_pos = None if window is None else jnp.repeat(positions, g, axis=1)  # [B, R]
  block_q = block_q or BLOCK_Q
  block_kv = block_kv or BLOCK_KV
  min_block = 1 if interpret else _MIN_BLOCK
  row_block = _rows_per_program(t * g, min(block_q * g, _MAX_ROWS), min_block)

  # Triton takes only power-of-two tiles; interpreted, any block size runs
  # (the tests use small odd ones, to reach every edge).
  key_block = (lambda size: size) if interpret else _power_of_two_at_most
  scales = (cache.k_scale, cache.v_scale) if cache.quantized else None
  flash = functools.partial(_flash, group=g, row_block=row_block, dot_dtype=dot_dtype,
                            softcap=softcap, interpret=interpret, window=window, row_pos=row_pos)
  cached = flash(rows, row_ok, cache.k, cache.v, cache.valid, scales, end, causal=False,
                 key_block=key_block(min(block_kv, cache.max_len)),
                 key_pos=None if window is None else cache.positions)
  if t >= min_block:
    new = flash(rows, row_ok, k_new, v_new, mask, None, jnp.int32(t), causal=causal,
                key_block=key_block(min(block_kv, t)), key_pos=positions)
  else:  # A decode step or a short chunk: one small block, no loop.
    new = _chunk_without_loop(rows, row_ok, k_new, v_new, mask, causal=causal, group=g,
                              window=window, row_pos=row_pos, key_pos=positions, softcap=softcap)
  o = normalize(accumulate(cached, new))  # [B, K, R, H]
  o = o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
  return o.astype(q.dtype)


def _power_of_two_at_most(size: int) -> int:
  """The largest power of two <= size, and at least Triton's smallest tile."""
  return max(1 << (size.bit_length() - 1), _MIN_BLOCK)


def _rows_per_program(rows: int, wanted: int, min_block: int) -> int:
  """RB: a power of two, at least min_block, at most what the rows need."""
  need = 1 << max(rows - 1, 0).bit_length()
  size = 1 << max(wanted - 1, 0).bit_length()
  return max(min(size, need), min_block)


def _flash(rows, row_ok, k, v, key_ok, scales, end, *, causal, group, row_block, key_block, softcap,
           dot_dtype, interpret, window=None, row_pos=None, key_pos=None) -> Partial:
  """The partial softmax of every query row over keys [0, end) of k and v.

  Args:
    rows: `[B, K, R, H]` scaled queries, token-major.
    row_ok: bool `[B, R]`, True for rows of real tokens.
    k, v: `[B, J, K, H]` keys and values (the cache, or the new chunk).
    key_ok: bool `[B, J]`, True for real keys.
    scales: None, or float32 `(k_scale, v_scale)` `[B, J, K]` of int8 k and v.
    end: int32 scalar, keys from `end` on are ignored (and their blocks
      skipped).
    causal: row r sees key i only if i <= r // group.
    group: G.
    row_block, key_block: RB and C.
    dot_dtype: the dtype the matmuls take.
    softcap: None, or the logits' soft cap (`online_softmax.probabilities`).
    interpret: run the kernel in interpret mode.
    window: None, or W (int32 scalar, may be traced): row r sees key i only
      if key_pos[i] > row_pos[r] - W (a ring cache's sliding window).
    row_pos, key_pos: with window, int32 `[B, R]` and `[B, J]` token positions.

  Returns:
    The partial `[B, K, R, ...]`, merged over the splits.
  """
  b, kh, r, h = rows.shape
  length = k.shape[1]
  padded = -(-r // row_block) * row_block
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, padded - r), (0, 0)))
  row_ok = jnp.pad(row_ok, ((0, 0), (0, padded - r))).astype(jnp.int32)
  windowed = window is not None
  row_blocks = padded // row_block
  key_blocks = -(-length // key_block)
  # Causal chunks do not split: their programs already cover every row block.
  splits = 1 if causal else max(1, min(key_blocks, _TARGET_PROGRAMS // (b * kh * row_blocks)))
  per_split = -(-key_blocks // splits)
  kernel = functools.partial(_kernel, key_block=key_block, per_split=per_split, length=length,
                             row_block=row_block, group=group, causal=causal, quantized=scales
                             is not None, windowed=windowed, dot_dtype=dot_dtype, softcap=softcap,
                             precision=_precision(dot_dtype))

  def keys(*block):  # A (b, kv head)'s whole key axis.
    return pl.BlockSpec(block, lambda i, j, m, s: (i, 0, j, 0)[:len(block)])

  in_specs = [
      pl.BlockSpec((2,), lambda i, j, m, s: (0,)),
      pl.BlockSpec((None, None, row_block, h), lambda i, j, m, s: (i, j, m, 0)),
      pl.BlockSpec((None, row_block), lambda i, j, m, s: (i, m)),
      keys(None, length, None, h),
      keys(None, length, None, h),
      pl.BlockSpec((None, length), lambda i, j, m, s: (i, 0)),
  ]
  # The scalars: end, and the window (unused without one).
  scalars = jnp.stack(
      [jnp.asarray(end, jnp.int32),
       jnp.asarray(0 if window is None else window, jnp.int32)])
  operands = [scalars, rows, row_ok, k, v, key_ok.astype(jnp.int32)]
  if scales is not None:
    scale_spec = pl.BlockSpec((None, length, None), lambda i, j, m, s: (i, 0, j))
    in_specs += [scale_spec, scale_spec]
    operands += list(scales)
  if windowed:
    in_specs += [
        pl.BlockSpec((None, row_block), lambda i, j, m, s: (i, m)),
        pl.BlockSpec((None, length), lambda i, j, m, s: (i, 0))
    ]
    operands += [
        jnp.pad(row_pos, ((0, 0), (0, padded - r))).astype(jnp.int32),
        key_pos.astype(jnp.int32)
    ]
  out_shape = [
      jax.ShapeDtypeStruct((b, kh, splits, padded, h), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, splits, padded), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, splits, padded), jnp.float32)
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, row_block, h), lambda i, j, m, s: (i, j, s, m, 0)),
      pl.BlockSpec((None, None, None, row_block), lambda i, j, m, s: (i, j, s, m)),
      pl.BlockSpec((None, None, None, row_block), lambda i, j, m, s: (i, j, s, m))
  ]
  params = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # Only where it compiles.
    params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
  o, m, l = pl.pallas_call(kernel, grid=(b, kh, row_blocks, splits), in_specs=in_specs,
                           out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                           name="kvattn_flash", **params)(*operands)
  part = accumulate_axis(Partial(o, m, l), axis=2)  # Over the splits.
  return Partial(part.o[:, :, :r], part.m[:, :, :r], part.l[:, :, :r])


def _kernel(scalars_ref, q_ref, q_ok_ref, k_ref, v_ref, k_ok_ref, *refs, key_block, per_split,
            softcap, length, row_block, group, causal, quantized, windowed, dot_dtype, precision):
  """One program: RB query rows of one (row of the batch, kv head), one split of the keys."""
  refs = list(refs)
  k_scale_ref, v_scale_ref = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
  row_pos_ref, key_pos_ref = (refs.pop(0), refs.pop(0)) if windowed else (None, None)
  o_ref, m_ref, l_ref = refs
  row_start = pl.program_id(2) * row_block
  split = pl.program_id(3)
  end = scalars_ref[0]
  q = q_ref[...]
  q_ok = q_ok_ref[...] != 0
  token = (row_start + lax.broadcasted_iota(jnp.int32, (row_block, 1), 0)) // group
  needed = end
  if causal:  # Keys past this program's last token are never read.
    needed = jnp.minimum(end, (row_start + row_block - 1) // group + 1)
  first_block = split * per_split
  last_block = jnp.minimum(first_block + per_split, (needed + key_block - 1) // key_block)

  def body(j, acc):
    first = j * key_block
    # When C does not divide J, the last block starts at J - C and overlaps
    # the one before; keys below its nominal start were counted there.
    at = jnp.minimum(first, length - key_block)
    keys = pl.ds(at, key_block)
    slot = at + lax.broadcasted_iota(jnp.int32, (1, key_block), 1)
    ok = (k_ok_ref[keys] != 0)[None, :] & (slot >= first) & (slot < needed)
    allowed = q_ok[:, None] & ok
    if causal:
      allowed = allowed & (slot <= token)
    if windowed:  # Keys at positions <= p - W are out of the row's window.
      allowed = allowed & (key_pos_ref[keys][None, :] > row_pos_ref[...][:, None] - scalars_ref[1])
    k = k_ref[keys, :]
    v = v_ref[keys, :]
    if quantized:
      k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    # Values of keys nobody may see are zeroed: 0 times a NaN or inf left at
    # padding or in a slot never written would still be NaN.
    column = at + lax.broadcasted_iota(jnp.int32, (key_block, 1), 0)
    key_ok = ((k_ok_ref[keys] != 0)[:, None] & (column >= first) & (column < needed))
    v = jnp.where(key_ok, v, jnp.zeros_like(v))
    logits = lax.dot_general(q, k.astype(dot_dtype), (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [RB, C]
    if quantized:
      logits = logits * k_scale_ref[keys][None, :]
    p, m = probabilities(logits, allowed, 1, softcap)
    pv = jnp.where(allowed, p * v_scale_ref[keys][None, :], 0.0) if quantized else p
    o = lax.dot_general(pv.astype(dot_dtype), v.astype(dot_dtype), (((1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)  # [RB, H]
    return accumulate(acc, Partial(o, m, jnp.sum(p, axis=1)))

  acc = lax.fori_loop(first_block, last_block, body, empty((row_block,), q.shape[-1]))
  o_ref[...] = acc.o
  m_ref[...] = acc.m
  l_ref[...] = acc.l


def _precision(dot_dtype) -> lax.Precision | None:
  """HIGHEST for a float32 matmul when JAX's default matmul precision asks for it.

  XLA applies `jax_default_matmul_precision` itself; a Triton kernel does not
  see it, so it is read here, at trace time. None (TF32 on NVIDIA GPUs)
  otherwise, and for 16-bit matmuls.
  """
  wanted = jax.config.jax_default_matmul_precision
  if dot_dtype == jnp.float32 and wanted in ("highest", "float32", "F32_F32_F32"):
    return lax.Precision.HIGHEST
  return None


def _chunk_without_loop(rows, row_ok, k, v, key_ok, *, causal, group, window=None, row_pos=None,
                        key_pos=None, softcap=None) -> Partial:
  """The new chunk's partial in plain XLA, for a few tokens (one block, no loop)."""
  t = k.shape[1]
  logits = jnp.einsum("BKRH,BTKH->BKRT", rows.astype(jnp.float32), k.astype(jnp.float32))
  allowed = row_ok[:, None, :, None] & key_ok[:, None, None, :]
  if causal:
    token = lax.broadcasted_iota(jnp.int32, (t * group, t), 0) // group
    allowed = allowed & (lax.broadcasted_iota(jnp.int32, (t * group, t), 1) <= token)[None, None]
  if window is not None:
    allowed = allowed & (key_pos[:, None, None, :] > row_pos[:, None, :, None] - window)
  p, m = probabilities(logits, allowed, 3, softcap)
  v = jnp.where(key_ok[:, :, None, None], v.astype(jnp.float32), 0.0)  # Padding stays inert.
  o = jnp.einsum("BKRT,BTKH->BKRH", p, v)
  return Partial(o, m, jnp.sum(p, axis=3))
