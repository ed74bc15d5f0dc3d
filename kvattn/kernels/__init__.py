"""Attention kernels behind `kvattn.cached_attention`, one module per implementation.

Every implementation is a function with the same signature:

    attend(q, k_new, v_new, cache, start, mask, *, prefix_lm, block_q, block_kv)
        -> (o, cache)

  q: `[B, T, N, H]` queries (after RoPE, if used).
  k_new, v_new: `[B, T, K, H]` the new tokens' keys and values as the cache
    holds them (`kvattn.cache.append` returns them): in the cache's dtype, or
    dequantised to float32 for an int8 cache.
  cache: the `KVCache` after the write (`kvattn.cache.append`). Its slots
    `[0, start)` are the cached prefix each query attends to; the new tokens
    are attended from `k_new`/`v_new`, so an overflowed write (nothing
    written) still gives the right output.
  start: int32 scalar, the cache index before the write.
  mask: bool `[B, T]`, True for real tokens.
  prefix_lm: a Python bool: the new tokens see each other bidirectionally.
  block_q, block_kv: positive ints or None (the implementation's default);
    tuning only, never a change of result beyond float32 rounding.

  Returns `o [B, T, N, H]` in q's dtype, and the cache it was given (threaded
  through so that the compiler can keep it in place).

and, for ring (sliding-window) caches, a second function:

    attend_ring(q, k_new, v_new, cache, positions, mask, *, block_q, block_kv) -> (o, cache)

  cache: the ring as it was before the write (a chunk longer than the ring
    overwrites slots its own first tokens must still see); returned as it
    came, threaded through the reads, as `attend` returns its cache; the
    write goes into the returned one. (XLA:CPU still copies the ring's
    buffers to write them after the reads: tests/model_memory_test.py.)
  positions: int32 `[B, T]` the new tokens' positions; each query sees the
    ring's valid slots and the new keys at positions p - W + 1 .. p.

Implementations never validate: `cached_attention` checks everything once.
Shape legend: B batch, T new tokens, S = max_len, N query heads, K kv heads,
G = N // K, H head dim.
"""
