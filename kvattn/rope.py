"""Rotary position embeddings (RoPE).

Shape legend:
  B: batch size
  T: number of tokens
  N: number of heads (query or key/value)
  H: head dimension (even)
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kvattn._checks import check_shape


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates `x [B, T, N, H]` by the angle of each token's position.

  Uses the half-split layout of Llama and Gemma: feature `i` is paired with
  feature `i + H/2`, rotated by `positions * base ** (-2i / H)`. Computed in
  float32 and returned in x's dtype.

  Args:
    x: `[B, T, N, H]` queries or keys, H even.
    positions: integer `[B, T]` position of each token in its own sequence.
    base: the RoPE wavelength base, a positive number.
  """
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"x shape should be (B, T, N, H): but got {shape}")
  b, t, _, h = shape
  if h % 2:
    raise ValueError(f"x shape should be (B, T, N, H) with H even: but got {shape}")
  check_shape("positions", positions, "(B, T)", (b, t))
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions dtype should be an integer dtype: but got {positions.dtype}")
  check_base(base, "base")
  return rotate(x, positions, base)


def check_base(base, name: str = "rope_base") -> None:
  """Raises TypeError/ValueError unless the RoPE base is a positive number.

  A Python or numpy number is checked; a jax scalar (traced, perhaps) is
  taken as it is.
  """
  if getattr(base, "shape", None) == () and hasattr(base, "dtype") and not isinstance(
      base, np.generic):
    if not jnp.issubdtype(base.dtype, jnp.number):
      raise TypeError(f"{name} should be a positive float: but got dtype {base.dtype}")
    return
  if isinstance(base, (bool, np.bool_)) or not isinstance(base, numbers.Real):
    raise TypeError(f"{name} should be a positive float: but got {base!r}")
  if not base > 0:
    raise ValueError(f"{name} should be a positive float: but got {base!r}")


def rotate(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """`apply_rope` without the checks (for callers that made them)."""
  h = x.shape[-1]
  inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
