"""Attention parameters: a plain dict in Flax DenseGeneral layout.

Shape legend:
  DM: model width
  N: number of query heads
  K: number of key/value heads
  H: head dimension

Keys: `wq [DM, N, H]`, `wk [DM, K, H]`, `wv [DM, K, H]`, `wo [N, H, DM]`, and
optional biases `bq [N, H]`, `bk [K, H]`, `bv [K, H]`, `bo [DM]`, used when
present. The kernels match Flax's `DenseGeneral` kernels, so checkpoints map
one to one.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kvattn._checks import check_positive_ints, check_shape

Params = Mapping[str, jax.Array]

_REQUIRED = ("wq", "wk", "wv", "wo")
_OPTIONAL = ("bq", "bk", "bv", "bo")


def init_params(
    key: jax.Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    use_bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> dict[str, jax.Array]:
  """Returns randomly initialised attention params.

  Kernels are drawn from a normal with standard deviation 1/sqrt(fan_in)
  (LeCun normal); biases start at zero.

  Args:
    key: a PRNG key.
    d_model: DM.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads; default N. N must be a multiple of K
      (K == N: multi-head, 1 < K < N: grouped-query, K == 1: multi-query).
    head_dim: H; default DM // N.
    use_bias: add zero biases bq, bk, bv, bo.
    dtype: parameter dtype.
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if head_dim is None:
    head_dim = d_model // num_heads
  check_positive_ints(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim)
  if num_heads % num_kv_heads:
    raise ValueError(
        f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
  dm, n, k, h = d_model, num_heads, num_kv_heads, head_dim
  shapes = {"wq": (dm, n, h), "wk": (dm, k, h), "wv": (dm, k, h), "wo": (n, h, dm)}
  fan_in = {"wq": dm, "wk": dm, "wv": dm, "wo": n * h}
  # One draw for all kernels, then split: one random-number kernel to compile
  # instead of four (threefry compiles slowly on CPU).
  sizes = [math.prod(shape) for shape in shapes.values()]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
  params = {name: (piece.reshape(shape) * fan_in[name] ** -0.5).astype(dtype)
            for (name, shape), piece in zip(shapes.items(), pieces)}
  if use_bias:
    params.update(bq=jnp.zeros((n, h), dtype), bk=jnp.zeros((k, h), dtype),
                  bv=jnp.zeros((k, h), dtype), bo=jnp.zeros((dm,), dtype))
  return params


def check_params(params: Any, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
  """Validates params against the cache's K and H; returns (DM, N)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params should be a dict of arrays: but got {type(params).__name__}")
  missing = [name for name in _REQUIRED if name not in params]
  if missing:
    raise ValueError(f"params is missing {missing}; expected keys {list(_REQUIRED)}")
  unknown = sorted(set(params) - set(_REQUIRED) - set(_OPTIONAL))
  if unknown:
    raise ValueError(f"params has unknown keys {unknown}")
  wq = params["wq"]
  shape = getattr(wq, "shape", None)
  if shape is None or len(shape) != 3:
    raise ValueError(f"params['wq'] shape should be (DM, N, H): but got {shape}")
  dm, n, h = shape
  if h != head_dim:
    raise ValueError(
        f"params['wq'] shape should be (DM, N, H)=({dm}, {n}, {head_dim}) with the "
        f"cache's head_dim: but got {shape}")
  if n % num_kv_heads:
    raise ValueError(
        f"query heads N={n} (params['wq']) must be a multiple of the cache's kv heads "
        f"K={num_kv_heads}")
  k = num_kv_heads
  expected = {
      "wk": ("(DM, K, H)", (dm, k, h)), "wv": ("(DM, K, H)", (dm, k, h)),
      "wo": ("(N, H, DM)", (n, h, dm)), "bq": ("(N, H)", (n, h)),
      "bk": ("(K, H)", (k, h)), "bv": ("(K, H)", (k, h)), "bo": ("(DM,)", (dm,)),
  }
  for name, (legend, shape) in expected.items():
    if name in params:
      check_shape(f"params['{name}']", params[name], legend, shape)
  return dm, n
