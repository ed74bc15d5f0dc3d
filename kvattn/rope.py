"""Rotary position embeddings (RoPE), with the frequency scalings of long-context checkpoints.

Shape legend:
  B: batch size
  T: number of tokens
  N: number of heads (query or key/value)
  H: head dimension (even)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvattn._checks import check_shape, is_real

SCALING_KINDS = ("linear", "llama3")


class Scaling(NamedTuple):
  """A change of RoPE's frequencies for contexts past the trained length (hashable, static).

  The two kinds of Hugging Face's `rope_scaling` that Llama-family checkpoints
  use:

    * "linear": every frequency divided by `factor` (positions interpolated).
    * "llama3": Llama 3.1's rule. Wavelengths longer than
      `original_max_positions / low_freq_factor` are divided by `factor`,
      those shorter than `original_max_positions / high_freq_factor` are kept,
      and the ones between are blended smoothly.

  Fields:
    kind: "linear" or "llama3".
    factor: the scaling factor, > 0.
    low_freq_factor, high_freq_factor: "llama3" only; high > low > 0.
    original_max_positions: "llama3" only; the context length trained on.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0,
               scaling: Scaling | None = None) -> jax.Array:
  """Rotates `x [B, T, N, H]` by the angle of each token's position.

  Uses the half-split layout of Llama and Gemma: feature `i` is paired with
  feature `i + H/2`, rotated by `positions * base ** (-2i / H)` (that
  frequency changed by `scaling`, if given). Computed in float32 and returned
  in x's dtype.

  Args:
    x: `[B, T, N, H]` queries or keys, H even.
    positions: integer `[B, T]` position of each token in its own sequence.
    base: the RoPE wavelength base, a positive number.
    scaling: None, or a `Scaling` of the frequencies.
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
  check_scaling(scaling, "scaling")
  return rotate(x, positions, base, scaling)


def check_base(base, name: str = "rope_base") -> None:
  """Raises ValueError unless the RoPE base is a positive number.

  A Python or numpy number is checked; a jax scalar (traced, perhaps) is
  taken as it is.
  """
  if getattr(base, "shape", None) == () and hasattr(base, "dtype") and not isinstance(
      base, np.generic):
    if not jnp.issubdtype(base.dtype, jnp.number):
      raise ValueError(f"{name} should be a positive float: but got dtype {base.dtype}")
    return
  if not _positive_number(base):
    raise ValueError(f"{name} should be a positive float: but got {base!r}")


def check_scaling(scaling, name: str = "rope_scaling") -> None:
  """Raises TypeError/ValueError unless `scaling` is None or a valid `Scaling`."""
  if scaling is None:
    return
  if not isinstance(scaling, Scaling):
    raise TypeError(f"{name} should be None or a kvattn.rope.Scaling: but got {scaling!r}")
  if scaling.kind not in SCALING_KINDS:
    raise ValueError(f"{name}.kind should be one of {SCALING_KINDS}: but got {scaling.kind!r}")
  for field in ("factor", "low_freq_factor", "high_freq_factor", "original_max_positions"):
    if not _positive_number(getattr(scaling, field)):
      raise ValueError(f"{name}.{field} should be a positive number: but got "
                       f"{getattr(scaling, field)!r}")
  if scaling.kind == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
    raise ValueError(f"{name} should have high_freq_factor > low_freq_factor: but got "
                     f"{scaling.high_freq_factor} and {scaling.low_freq_factor}")


def inverse_frequencies(head_dim: int, base, scaling: Scaling | None = None) -> jax.Array:
  """float32 `[H/2]`: the angle per position of each feature pair (unchecked)."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  # "llama3": as Hugging Face's _compute_llama3_parameters.
  wavelength = 2 * math.pi / inv_freq
  low_wavelength = scaling.original_max_positions / scaling.low_freq_factor
  high_wavelength = scaling.original_max_positions / scaling.high_freq_factor
  scaled = jnp.where(wavelength > low_wavelength, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_positions / wavelength - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
  return jnp.where(medium, blended, scaled)


def rotate(x: jax.Array, positions: jax.Array, base: float,
           scaling: Scaling | None = None) -> jax.Array:
  """`apply_rope` without the checks (for callers that made them)."""
  inv_freq = inverse_frequencies(x.shape[-1], base, scaling)  # [H/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _positive_number(value) -> bool:
  return is_real(value) and value > 0
