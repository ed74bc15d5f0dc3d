"""Rotary position embeddings (RoPE).

Shape legend:
  B: batch size
  T: number of tokens
  N: number of heads (query or key/value)
  H: head dimension (even)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates `x [B, T, N, H]` by the angle of each token's position.

  Uses the half-split layout of Llama and Gemma: feature `i` is paired with
  feature `i + H/2`, rotated by `positions * base ** (-2i / H)`. Computed in
  float32 and returned in x's dtype.

  Args:
    x: `[B, T, N, H]` queries or keys.
    positions: int `[B, T]` position of each token in its own sequence.
    base: the RoPE wavelength base.
  """
  if x.ndim != 4:
    raise ValueError(f"x should have shape (B, T, N, H): but got {x.shape}")
  b, t, _, h = x.shape
  if h % 2:
    raise ValueError(f"RoPE needs an even head dimension H: but got H={h}")
  if getattr(positions, "shape", None) != (b, t):
    raise ValueError(
        f"positions shape should be (B, T)=({b}, {t}): but got {getattr(positions, 'shape', None)}")
  inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
