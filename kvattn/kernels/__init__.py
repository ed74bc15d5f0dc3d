"""Attention kernels behind `kvattn.cached_attention`: one backend record per module.

Each kernel module exports `BACKEND`, a `Backend`: its two entry points,
where it compiles, where it runs interpreted, and the shapes its compiled
kernel cannot take. `kvattn.attention` keeps them in one table (`BACKENDS`)
and alone decides, per call, which one runs and whether compiled or
interpreted; kernels never fall back or choose a mode by themselves.

The two entry points share one signature and one return type:

    attend(q, k_new, v_new, cache, start, mask, *, prefix_lm, block_q, block_kv,
           scale, softcap, interpret) -> (o, cache)

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
  block_q, block_kv: positive ints or None (the kernel's default); tuning
    only, never a change of result beyond float32 rounding.
  scale: the logits' scale, a Python float; None for 1/sqrt(H).
  softcap: None, or c, a positive Python float: each logit (after scale)
    becomes `c * tanh(logit / c)` before the mask and the softmax (Gemma 2's
    attention logit soft-capping).
  interpret: a Python bool: run the kernel in interpret mode (slow, for
    tests). Only a backend with `interpret_platforms` is ever asked to.

  Returns `o [B, T, N, H]` in q's dtype, and the cache it was given (threaded
  through so that the compiler can keep it in place).

    attend_ring(q, k_new, v_new, cache, positions, mask, *, block_q, block_kv,
                scale, softcap, interpret) -> (o, cache)

  For ring (sliding-window) caches. cache: the ring as it was before the
  write (a chunk longer than the ring overwrites slots its own first tokens
  must still see); returned as it came, threaded through the reads; the write
  goes into the returned one. (XLA:CPU still copies the ring's buffers to
  write them after the reads: tests/model_memory_test.py.)
  positions: int32 `[B, T]` the new tokens' positions; each query sees the
  ring's valid slots and the new keys at positions p - W + 1 .. p.

Kernels never validate: `cached_attention` checks everything once.
Shape legend: B batch, T new tokens, S slots, N query heads, K kv heads,
G = N // K, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


def _takes_every_shape(head_dim: int, num_slots: int) -> None:
  del head_dim, num_slots
  return None


@dataclasses.dataclass(frozen=True)
class Backend:
  """One kernel module: its entry points and what it can run.

  Attributes:
    name: the `implementation=` name.
    attend: attention over a linear cache (the signature above).
    attend_ring: attention over a ring cache (the signature above).
    platforms: the lowering platforms ("cpu", "cuda", "rocm", "tpu") it
      compiles for; None for every platform.
    interpret_platforms: the platforms where it runs in interpret mode when
      named (slow: for tests on machines without its hardware).
    unsupported: `unsupported(head_dim, num_slots)`: why the compiled kernel
      cannot take these shapes, or None if it can. Interpret mode takes any.
  """
  name: str
  attend: Callable
  attend_ring: Callable
  platforms: tuple[str, ...] | None = None
  interpret_platforms: tuple[str, ...] = ()
  unsupported: Callable[[int, int], str | None] = _takes_every_shape

  def compiles_on(self, platform: str) -> bool:
    return self.platforms is None or platform in self.platforms
