"""Validation at the API boundary: clear errors that name the argument.

All checks look at static shapes and dtypes only, so they run at trace time
and cost nothing under `jit`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvattn import layout


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
    got = (f"a Python {type(x).__name__} (pass an array, e.g. np.asarray({name}))" if isinstance(
        x, (list, tuple)) else actual)
    raise ValueError(f"{name} shape should be {legend}={tuple(expected)}: but got {got}")


def is_int(x: Any) -> bool:
  """A Python or numpy integer, not a bool: the one test of "an int" in the package."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
  """A Python or numpy real number, not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_positive_ints(**values: Any) -> None:
  """Raises ValueError naming the first value that is not a positive int (bools excluded)."""
  for name, value in values.items():
    if not is_int(value) or value < 1:
      raise ValueError(f"{name} should be a positive int: but got {value!r}")


def is_concrete(x: Any) -> bool:
  """True when x's values are known now: not a tracer of `jit`, `vmap` or `grad`."""
  return not isinstance(x, jax.core.Tracer)


def check_heads(num_heads: int, num_kv_heads: int) -> None:
  """Raises ValueError unless the query heads N are a multiple of the kv heads K."""
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} should be a multiple of the kv heads "
                     f"K={num_kv_heads}: but N % K = {num_heads % num_kv_heads}")


def check_mask(mask: Any, batch: int, num_tokens: int | None, name: str = "mask") -> None:
  """Raises ValueError unless mask (called `name` in the message) is a bool array [B, T]."""
  check_shape(name, mask, "(B, T)", (batch, num_tokens))
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{name} dtype should be bool: but got {mask.dtype}")


def check_cache(cache: Any, views: bool = False) -> None:
  """Raises TypeError/ValueError unless cache is a well-formed KVCache (see kvattn.layout).

  A layer view (`kvattn.cache.layer_view`) passes only where `views` is True:
  the attention calls read and write views, the cache edits do not.
  """
  from kvattn.cache import KVCache  # Local import: cache.py imports this module.
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache should be a kvattn.KVCache: but got {type(cache).__name__}")
  if cache.layer is not None and not views:
    raise TypeError("cache should be a KVCache, not a layer view (kvattn.layer_view): this "
                    "function takes the whole stack, e.g. kvattn.stack_of(view)")
  k_field = layout.CACHE["k"]
  shape = shape_of(cache.k)
  # A layer view (kvattn.cache.layer_view): every leaf has a leading L axis.
  view = cache.layer is not None
  if view and (shape_of(cache.layer) != () or cache.layer.dtype != jnp.int32):
    raise ValueError(f"cache.layer should be an int32 scalar or None: but got {cache.layer!r}")
  lead = 1 if view else 0
  if shape is None or len(shape) != len(k_field.dims) + lead:
    legend = "(L, " + k_field.legend()[1:] if view else k_field.legend()
    raise ValueError(f"cache.k shape should be {legend}: but got {shape}")
  sizes = dict(zip(k_field.dims, shape[lead:]))
  stacked = shape[:lead]
  int8 = cache.k.dtype == jnp.int8
  if not (int8 or jnp.issubdtype(cache.k.dtype, jnp.floating)):
    raise ValueError(f"cache.k dtype should be a floating dtype or int8: but got {cache.k.dtype}")
  if getattr(cache.v, "dtype", None) != cache.k.dtype:
    raise ValueError(f"cache.v dtype should be cache.k's, {cache.k.dtype}: but got "
                     f"{getattr(cache.v, 'dtype', None)}")
  ring = [
      name for name, field in layout.CACHE.items()
      if field.feature == "window" and getattr(cache, name) is not None
  ]
  ring += [name for name in layout.CACHE_STATIC if getattr(cache, name) is not None]
  for name in layout.CACHE_STATIC:  # A ring's static ints: both, positive, or neither.
    x = getattr(cache, name)
    if ring and not (is_int(x) and x >= 1):
      raise ValueError(f"cache.{name} should be a positive int in a ring cache (one with "
                       f"{ring}): but got {x!r}")
  for name, field in layout.CACHE.items():
    x = getattr(cache, name)
    if field.feature == "int8":  # The scales: present exactly when k is int8.
      if not int8 and x is not None:
        raise ValueError(f"cache.{name} should be None for a {cache.k.dtype} cache: "
                         f"but got shape {shape_of(x)}")
      if int8 and x is None:
        raise ValueError(f"cache.{name} should be a {field.dtype} {field.legend()}="
                         f"{field.shape(sizes)} array for an int8 cache: but got None")
    elif field.feature == "window":  # A ring cache's leaves: all of them or none.
      if ring and x is None:
        raise ValueError(f"cache.{name} should be a {field.dtype} {field.legend()} array in a "
                         f"ring cache (one with {ring}): but got None")
    if x is None:
      continue
    legend = "(L, " + field.legend()[1:] if view and field.dims else (
        "(L,)" if view else field.legend())
    check_shape(f"cache.{name}", x, legend, stacked + field.shape(sizes))
    if field.dtype is not None and x.dtype != jnp.dtype(field.dtype):
      raise ValueError(f"cache.{name} dtype should be {field.dtype}: but got {x.dtype}")
