"""Validation at the API boundary: clear errors that name the argument.

All checks look at static shapes and dtypes only, so they run at trace time
and cost nothing under `jit`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def shape_of(x: Any) -> tuple[int, ...] | None:
  return getattr(x, "shape", None)


def check_shape(name: str, x: Any, legend: str, expected: tuple[int | None, ...]) -> None:
  """Raises ValueError unless x's shape matches `expected` (None matches anything).

  The message gives the symbolic and the concrete shape, e.g.
  "x shape should be (B, T, DM)=(2, None, 16): but got (2, 5, 8)".
  """
  actual = shape_of(x)
  ok = actual is not None and len(actual) == len(expected) and all(
      e is None or a == e for a, e in zip(actual, expected))
  if not ok:
    raise ValueError(
        f"{name} shape should be {legend}={tuple(expected)}: but got {actual}")


def check_positive_ints(**values: Any) -> None:
  """Raises ValueError naming the first value that is not a positive int (bools excluded)."""
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_mask(mask: Any, batch: int, num_tokens: int | None) -> None:
  """Raises ValueError unless mask is a bool array of shape [B, T]."""
  check_shape("mask", mask, "(B, T)", (batch, num_tokens))
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask dtype should be bool: but got {mask.dtype}")


def check_cache(cache: Any) -> None:
  """Raises TypeError/ValueError unless cache is a well-formed KVCache."""
  from kvattn.cache import KVCache  # Local import: cache.py imports this module.
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache should be a kvattn.KVCache: but got {type(cache).__name__}")
  b, s, k, h = _rank4("cache.k", cache.k)
  check_shape("cache.v", cache.v, "(B, S, K, H)", (b, s, k, h))
  check_shape("cache.valid", cache.valid, "(B, S)", (b, s))
  check_shape("cache.lengths", cache.lengths, "(B,)", (b,))
  check_shape("cache.index", cache.index, "()", ())
  check_shape("cache.overflow", cache.overflow, "()", ())
  if cache.index.dtype != jnp.int32:
    raise ValueError(f"cache.index dtype should be int32: but got {cache.index.dtype}")
  _check_scales(cache, (b, s, k))


def _check_scales(cache: Any, shape: tuple[int, int, int]) -> None:
  """int8 k and v come with both float32 scales [B, S, K]; float k and v with neither."""
  int8 = cache.k.dtype == jnp.int8
  if (cache.v.dtype == jnp.int8) != int8:
    raise ValueError(
        f"cache.k and cache.v should both be int8 or neither: but got "
        f"{cache.k.dtype} and {cache.v.dtype}")
  for name in ("k_scale", "v_scale"):
    scale = getattr(cache, name)
    if not int8:
      if scale is not None:
        raise ValueError(f"cache.{name} should be None for a {cache.k.dtype} cache: "
                         f"but got shape {shape_of(scale)}")
      continue
    if scale is None:
      raise ValueError(f"cache.{name} should be a float32 (B, S, K)={shape} array for "
                       "an int8 cache: but got None")
    check_shape(f"cache.{name}", scale, "(B, S, K)", shape)
    if scale.dtype != jnp.float32:
      raise ValueError(f"cache.{name} dtype should be float32: but got {scale.dtype}")


def _rank4(name: str, x: Any) -> tuple[int, int, int, int]:
  shape = shape_of(x)
  if shape is None or len(shape) != 4:
    raise ValueError(f"{name} shape should be (B, S, K, H): but got {shape}")
  return shape
