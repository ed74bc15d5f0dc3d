"""Rotary position embeddings (RoPE), with the frequency scalings of long-context checkpoints.

Shape legend:
  B: batch size
  T: number of tokens
  N: number of heads (query or key/value)
  H: head dimension (even)
  R: rotary dimension, the first R of the H features are rotated (even, R <= H)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvattn._checks import check_shape, is_int, is_real

SCALING_KINDS = ("linear", "llama3", "yarn", "longrope")
# Hugging Face's "dynamic" NTK scaling recomputes the frequencies from the longest sequence seen
# so far, which changes the rotation of tokens already in the cache: no per-position rotation.
_REFUSED_KINDS = {
    "dynamic": ("its frequencies depend on the longest sequence seen so far, so growing the "
                "context changes the rotation of tokens already cached: it is not a rotation "
                "per position")
}


class Scaling(NamedTuple):
  """A change of RoPE's frequencies for contexts past the trained length (hashable, static).

  The kinds of Hugging Face's `rope_scaling` (`rope_parameters` in transformers 5),
  with its definitions (transformers' `modeling_rope_utils`):

    * "linear": every frequency divided by `factor` (positions interpolated).
    * "llama3": Llama 3.1's rule. Wavelengths longer than
      `original_max_positions / low_freq_factor` are divided by `factor`,
      those shorter than `original_max_positions / high_freq_factor` are kept,
      and the ones between are blended smoothly.
    * "yarn": YaRN. Frequency pair i is `(1 - ramp_i) * f_i + ramp_i * f_i / factor`,
      ramp_i going linearly in i from 0 at the pair that turns `beta_fast` times in
      `original_max_positions` tokens to 1 at the one that turns `beta_slow` times (those
      two pair indices rounded outwards when `truncate`). cos and sin are multiplied by
      the attention factor.
    * "longrope": LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini). Frequency pair i is
      `f_i / short_factor[i]` or `f_i / long_factor[i]`: the long factors for a whole
      call (every token of it) when the call's largest position + 1 exceeds
      `original_max_positions`, the short ones otherwise. That is Hugging Face's rule
      per forward call (`dynamic_rope_update`): cached keys keep the rotation of the
      call that wrote them, as in transformers, so a prompt prefilled past the
      original length is rotated with the long factors throughout, while one that
      grows past it in decode keeps the short rotation of its first tokens. cos and
      sin are multiplied by the attention factor.

  Here `f_i = base ** (-2i / R)` for pair i of the R rotated features.

  Fields:
    kind: "linear", "llama3", "yarn" or "longrope".
    factor: the scaling factor, > 0 (for "longrope", only the attention factor
      uses it: Hugging Face's max_position_embeddings / original_max_position_embeddings
      unless the config sets it).
    low_freq_factor, high_freq_factor: "llama3" only; high > low > 0.
    original_max_positions: "llama3", "yarn", "longrope": the context length trained on.
    beta_fast, beta_slow: "yarn" only; the rotation counts where the ramp starts and
      ends, beta_fast >= beta_slow > 0.
    truncate: "yarn" only; round the ramp's ends to whole pair indices (as transformers
      does unless the config says `"truncate": false`).
    attention_factor: "yarn" and "longrope" only; the factor of cos and sin, > 0. None
      takes Hugging Face's default (see `attention_factor`).
    short_factor, long_factor: "longrope" only; tuples of R/2 positive numbers (tuples,
      not lists, so that the Scaling stays hashable).
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float | None = None
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0,
               scaling: Scaling | None = None, rotary_dim: int | None = None) -> jax.Array:
  """Rotates `x [B, T, N, H]` by the angle of each token's position.

  Uses the half-split layout of Llama and Gemma (Hugging Face's `rotate_half`):
  among the R rotated features, feature `i` is paired with feature `i + R/2` and
  rotated by `positions * base ** (-2i / R)` (that frequency changed by
  `scaling`, if given). With R < H, as with Hugging Face's `partial_rotary_factor`
  (Phi-3, Phi-4-mini), the first R features are rotated and the last H - R pass
  through unchanged. "yarn" and "longrope" also multiply the rotated features by
  their attention factor. Computed in float32 and returned in x's dtype.

  Args:
    x: `[B, T, N, H]` queries or keys.
    positions: integer `[B, T]` position of each token in its own sequence. For
      "longrope", `max(positions) + 1` over the whole call picks the long or the
      short factors (see `Scaling`): give padding tokens a position no larger than
      the real ones'.
    base: the RoPE wavelength base, a positive number.
    scaling: None, or a `Scaling` of the frequencies.
    rotary_dim: R, the number of leading features rotated: None for all H, or a
      positive even int <= H.
  """
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"x shape should be (B, T, N, H): but got {shape}")
  b, t, _, h = shape
  if rotary_dim is None and h % 2:
    raise ValueError(f"x shape should be (B, T, N, H) with H even: but got {shape}")
  check_rotary_dim(rotary_dim, h)
  check_shape("positions", positions, "(B, T)", (b, t))
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions dtype should be an integer dtype: but got {positions.dtype}")
  check_base(base, "base")
  check_scaling(scaling, "scaling", rotary_dim=h if rotary_dim is None else rotary_dim)
  return rotate(x, positions, base, scaling, rotary_dim)


def check_base(base, name: str = "rope_base") -> None:
  """Raises ValueError unless the RoPE base is a positive number.

  A Python or numpy number is checked; a jax scalar (traced, perhaps) is
  taken as it is.
  """
  if getattr(base, "shape", None) == () and hasattr(base,
                                                    "dtype") and not isinstance(base, np.generic):
    if not jnp.issubdtype(base.dtype, jnp.number):
      raise ValueError(f"{name} should be a positive float: but got dtype {base.dtype}")
    return
  if not _positive_number(base):
    raise ValueError(f"{name} should be a positive float: but got {base!r}")


def check_rotary_dim(rotary_dim, head_dim: int, name: str = "rotary_dim") -> None:
  """Raises ValueError unless `rotary_dim` is None or a positive even int <= head_dim."""
  if rotary_dim is None:
    return
  if not is_int(rotary_dim) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
    raise ValueError(f"{name} should be None or a positive even int <= H={head_dim}: but got "
                     f"{rotary_dim!r}")


def check_scaling(scaling, name: str = "rope_scaling", rotary_dim: int | None = None) -> None:
  """Raises TypeError/ValueError unless `scaling` is None or a valid `Scaling`.

  Args:
    scaling: the value to check.
    name: its name in the messages.
    rotary_dim: R, where known: then "longrope"'s factor lists must have R/2 entries.
  """
  if scaling is None:
    return
  if not isinstance(scaling, Scaling):
    raise TypeError(f"{name} should be None or a kvattn.rope.Scaling: but got {scaling!r}")
  if scaling.kind in _REFUSED_KINDS:
    raise ValueError(f"{name}.kind {scaling.kind!r} is not supported: "
                     f"{_REFUSED_KINDS[scaling.kind]}")
  if scaling.kind not in SCALING_KINDS:
    raise ValueError(f"{name}.kind should be one of {SCALING_KINDS}: but got {scaling.kind!r}")
  for field in ("factor", "low_freq_factor", "high_freq_factor", "original_max_positions",
                "beta_fast", "beta_slow"):
    if not _positive_number(getattr(scaling, field)):
      raise ValueError(f"{name}.{field} should be a positive number: but got "
                       f"{getattr(scaling, field)!r}")
  if scaling.kind == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
    raise ValueError(f"{name} should have high_freq_factor > low_freq_factor: but got "
                     f"{scaling.high_freq_factor} and {scaling.low_freq_factor}")
  if scaling.kind == "yarn" and scaling.beta_fast < scaling.beta_slow:
    raise ValueError(f"{name} should have beta_fast >= beta_slow: but got {scaling.beta_fast} "
                     f"and {scaling.beta_slow}")
  if not isinstance(scaling.truncate, (bool, np.bool_)):
    raise ValueError(f"{name}.truncate should be a bool: but got {scaling.truncate!r}")
  _check_only_for(scaling, name, "attention_factor", ("yarn", "longrope"))
  if scaling.attention_factor is not None and not _positive_number(scaling.attention_factor):
    raise ValueError(f"{name}.attention_factor should be None or a positive number: but got "
                     f"{scaling.attention_factor!r}")
  for field in ("short_factor", "long_factor"):
    _check_only_for(scaling, name, field, ("longrope",))
    values = getattr(scaling, field)
    if scaling.kind != "longrope":
      continue
    if not isinstance(values, tuple) or not values or not all(map(_positive_number, values)):
      raise ValueError(f"{name}.{field} should be a non-empty tuple of positive numbers (a "
                       f"tuple keeps the Scaling hashable): but got {values!r}")
  if rotary_dim is not None:
    _check_factor_lengths(scaling, rotary_dim, name)


def attention_factor(scaling: Scaling | None) -> float:
  """The factor of cos and sin: 1 but for "yarn" and "longrope", as Hugging Face's.

  `scaling.attention_factor` where set; otherwise, with s = `scaling.factor`
  (1 where s <= 1):

    * "yarn": `0.1 * ln(s) + 1` (`yarn_get_mscale`; a config's `mscale` and
      `mscale_all_dim` are folded into `attention_factor` by
      `kvattn.models.llama.rope_scaling_from_hf`);
    * "longrope": `sqrt(1 + ln(s) / ln(original_max_positions))`.
  """
  if scaling is None or scaling.kind not in ("yarn", "longrope"):
    return 1.0
  if scaling.attention_factor is not None:
    return float(scaling.attention_factor)
  s = scaling.factor
  if s <= 1:
    return 1.0
  if scaling.kind == "yarn":
    return 0.1 * math.log(s) + 1.0
  return math.sqrt(1 + math.log(s) / math.log(scaling.original_max_positions))


def inverse_frequencies(rotary_dim: int, base, scaling: Scaling | None = None,
                        seq_len: jax.Array | int | None = None) -> jax.Array:
  """float32 `[R/2]`: the angle per position of each feature pair.

  Unchecked, but for the length of "longrope"'s factor lists (a static shape).

  Args:
    rotary_dim: R, the number of rotated features (even).
    base: the RoPE wavelength base.
    scaling: None, or a valid `Scaling`.
    seq_len: "longrope" only: the call's largest position + 1, an int or an int
      scalar (traced, perhaps). The long factors where it exceeds
      `original_max_positions`; None: the short ones (as Hugging Face's
      `_compute_longrope_parameters`).
  """
  # Written as transformers writes them (1 / base**(2i/R), not base**(-2i/R)), so that the
  # float32 results agree to the last bit or so.
  wavelength_over_2pi = base**(jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  inv_freq = 1.0 / wavelength_over_2pi
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  if scaling.kind == "yarn":
    extrapolation = 1 - _yarn_ramp(rotary_dim, base, scaling)
    interpolated = 1.0 / (scaling.factor * wavelength_over_2pi)
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation
  if scaling.kind == "longrope":
    _check_factor_lengths(scaling, rotary_dim, "rope_scaling")
    short = 1.0 / (jnp.asarray(scaling.short_factor, jnp.float32) * wavelength_over_2pi)
    if seq_len is None:
      return short
    long = 1.0 / (jnp.asarray(scaling.long_factor, jnp.float32) * wavelength_over_2pi)
    return jnp.where(seq_len > scaling.original_max_positions, long, short)
  # "llama3": as Hugging Face's _compute_llama3_parameters.
  wavelength = 2 * math.pi / inv_freq
  low_wavelength = scaling.original_max_positions / scaling.low_freq_factor
  high_wavelength = scaling.original_max_positions / scaling.high_freq_factor
  scaled = jnp.where(wavelength > low_wavelength, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_positions / wavelength - scaling.low_freq_factor) /
            (scaling.high_freq_factor - scaling.low_freq_factor))
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
  return jnp.where(medium, blended, scaled)


def rotate(x: jax.Array, positions: jax.Array, base: float, scaling: Scaling | None = None,
           rotary_dim: int | None = None) -> jax.Array:
  """`apply_rope` without the checks (for callers that made them)."""
  h = x.shape[-1]
  r = h if rotary_dim is None else rotary_dim
  # HF's per-call choice of longrope's factors: seq_len is max(position_ids) + 1 of the call.
  seq_len = jnp.max(positions) + 1 if scaling is not None and scaling.kind == "longrope" else None
  inv_freq = inverse_frequencies(r, base, scaling, seq_len)  # [R/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None]
  scale = attention_factor(scaling)
  sin, cos = jnp.sin(angle) * scale, jnp.cos(angle) * scale
  x1, x2 = jnp.split(x[..., :r].astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return out if r == h else jnp.concatenate([out, x[..., r:]], axis=-1)


def _yarn_ramp(rotary_dim: int, base, scaling: Scaling) -> jax.Array:
  """float32 `[R/2]`: YaRN's weight of the interpolated frequency, as Hugging Face's.

  0 up to the pair index where a wavelength turns beta_fast times in
  original_max_positions tokens (kept: extrapolation), 1 from the one where it
  turns beta_slow times (divided by factor: interpolation), linear in the index
  between.
  """
  # The ends in float64 from a Python or numpy base, as transformers computes them (math.log,
  # floor, ceil); a jax base (traced, perhaps) gives them in its own dtype.
  xp = jnp if isinstance(base, jax.Array) else np

  def index(rotations):  # Solves original / wavelength(index) = rotations for the index.
    return (rotary_dim * xp.log(scaling.original_max_positions / (rotations * 2 * math.pi)) /
            (2 * xp.log(base)))

  low, high = index(scaling.beta_fast), index(scaling.beta_slow)
  if scaling.truncate:
    low, high = xp.floor(low), xp.ceil(high)
  low, high = xp.maximum(low, 0), xp.minimum(high, rotary_dim - 1)
  width = xp.where(low == high, 0.001, high - low)  # transformers' guard against 0 / 0.
  if xp is np:
    low, width = float(low), float(width)  # Weakly typed: the ramp stays float32.
  ramp = (jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / width
  return jnp.clip(ramp, 0, 1)


def _check_factor_lengths(scaling: Scaling, rotary_dim: int, name: str) -> None:
  if scaling.kind != "longrope":
    return
  for field in ("short_factor", "long_factor"):
    values = getattr(scaling, field)
    if len(values) != rotary_dim // 2:
      raise ValueError(f"{name}.{field} should have rotary_dim/2 = {rotary_dim // 2} entries "
                       f"(one per rotated feature pair; rotary_dim is H unless given): but got "
                       f"{len(values)}")


def _check_only_for(scaling: Scaling, name: str, field: str, kinds: tuple[str, ...]) -> None:
  if getattr(scaling, field) is not None and scaling.kind not in kinds:
    raise ValueError(f"{name}.{field} applies to kinds {kinds} only: but got {field}="
                     f"{getattr(scaling, field)!r} with kind {scaling.kind!r}")


def _positive_number(value) -> bool:
  return is_real(value) and value > 0
