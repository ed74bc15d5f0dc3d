"""int8 storage for the key/value cache: a scale per token and kv head.

Each cached vector `x[b, s, k, :]` is stored as int8 `round(x / scale)` with
`scale = max|x| / 127`, so the largest entry maps to +-127 and the rounding
error of every entry is at most scale / 2 (about 0.4% of the largest one).
Keys and values are dequantised inside the attention kernel, block by block.

Shape legend:
  B: batch size
  T: number of tokens
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_QMAX = 127.0


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Quantises `x [B, T, K, H]` to int8 with one float32 scale per `[B, T, K]`.

  Returns:
    `(xq, scale)`: xq int8 `[B, T, K, H]` in [-127, 127], scale float32
    `[B, T, K]`. An all-zero vector gets scale 0 and dequantises to zeros.
  """
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / _QMAX
  # Divide by 1 where the vector is all zeros: its entries are 0 anyway.
  safe = jnp.where(scale == 0.0, 1.0, scale)
  xq = jnp.clip(jnp.round(x / safe[..., None]), -_QMAX, _QMAX).astype(jnp.int8)
  return xq, scale


def dequantize(xq: jax.Array, scale: jax.Array) -> jax.Array:
  """Returns float32 `xq [B, T, K, H] * scale [B, T, K]`."""
  return xq.astype(jnp.float32) * scale[..., None]
