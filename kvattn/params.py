"""Attention parameters: a plain dict in Flax DenseGeneral layout.

Shape legend:
  DM: model width
  N: number of query heads
  K: number of key/value heads
  H: head dimension

Keys: `wq [DM, N, H]`, `wk [DM, K, H]`, `wv [DM, K, H]`, `wo [N, H, DM]`, and
optional biases `bq [N, H]`, `bk [K, H]`, `bv [K, H]`, `bo [DM]`, used when
present. The kernels match Flax's `DenseGeneral` kernels, so checkpoints map
one to one. Optional qk-norm scales, RMSNorm of q and k before RoPE: per head
`q_norm [H]`, `k_norm [H]` (Qwen3, Gemma 3), or over the whole projection
`q_norm_proj [N, H]`, `k_norm_proj [K, H]` (OLMo 2); a pair, one kind.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kvattn import layout
from kvattn._checks import check_heads, check_positive_ints, check_shape

Params = Mapping[str, jax.Array]


def init_params(
    key: jax.Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    use_bias: bool = False,
    qk_norm: str | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> dict[str, jax.Array]:
  """Returns randomly initialised attention params (the layout of `kvattn.layout.PARAMS`).

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
    qk_norm: None, "head" (q_norm, k_norm `[H]`) or "projection"
      (q_norm_proj `[N, H]`, k_norm_proj `[K, H]`): RMSNorm scales of ones.
    dtype: parameter dtype.
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if head_dim is None:
    head_dim = d_model // num_heads
  check_positive_ints(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim)
  check_heads(num_heads, num_kv_heads)
  if not isinstance(use_bias, bool):
    raise ValueError(f"use_bias should be a bool: but got {use_bias!r}")
  if qk_norm is not None and qk_norm not in layout.QK_NORMS:
    raise ValueError(f"qk_norm should be None or one of {sorted(layout.QK_NORMS)}: but got "
                     f"{qk_norm!r}")
  sizes = dict(DM=d_model, N=num_heads, K=num_kv_heads, H=head_dim)
  kernels = {name: f for name, f in layout.PARAMS.items() if not f.optional}
  # One draw for all kernels, then split: one random-number kernel to compile
  # instead of four (threefry compiles slowly on CPU).
  shapes = [f.shape(sizes) for f in kernels.values()]
  sizes_flat = [math.prod(shape) for shape in shapes]
  flat = jax.random.normal(key, (sum(sizes_flat),), jnp.float32)
  pieces = jnp.split(flat, list(itertools.accumulate(sizes_flat))[:-1])
  params = {
      name: (piece.reshape(shape) * math.prod(sizes[d] for d in f.fan_in)**-0.5).astype(dtype)
      for (name, f), shape, piece in zip(kernels.items(), shapes, pieces)
  }
  if use_bias:
    params.update({
        name: jnp.zeros(f.shape(sizes), dtype) for name, f in layout.PARAMS.items()
        if f.feature == "bias"
    })
  if qk_norm is not None:
    params.update({
        name: jnp.ones(layout.PARAMS[name].shape(sizes), dtype) for name in layout.QK_NORMS[qk_norm]
    })
  return params


def check_params(params: Any, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
  """Validates params against the cache's K and H; returns (DM, N)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params should be a dict of arrays: but got {type(params).__name__}")
  required = [name for name, f in layout.PARAMS.items() if not f.optional]
  missing = [name for name in required if name not in params]
  if missing:
    raise ValueError(f"params is missing {missing}; expected keys {required}")
  unknown = sorted(set(params) - set(layout.PARAMS))
  if unknown:
    raise ValueError(f"params has unknown keys {unknown}")
  wq = layout.PARAMS["wq"]
  shape = getattr(params["wq"], "shape", None)
  if shape is None or len(shape) != len(wq.dims):
    raise ValueError(f"params['wq'] shape should be {wq.legend()}: but got {shape}")
  sizes = dict(zip(wq.dims, shape), K=num_kv_heads)
  if sizes["H"] != head_dim:
    sizes["H"] = head_dim
    raise ValueError(f"params['wq'] shape should be {wq.legend()}={wq.shape(sizes)} with the "
                     f"cache's head_dim: but got {shape}")
  check_heads(sizes["N"], num_kv_heads)
  for name, field in layout.PARAMS.items():
    if name in params:
      check_shape(f"params['{name}']", params[name], field.legend(), field.shape(sizes))
  kinds = [kind for kind, names in layout.QK_NORMS.items() if any(n in params for n in names)]
  for kind in kinds:
    if not all(n in params for n in layout.QK_NORMS[kind]) or len(kinds) > 1:
      found = sorted(n for names in layout.QK_NORMS.values() for n in names if n in params)
      pairs = " or ".join(str(names) for names in layout.QK_NORMS.values())
      raise ValueError(f"params should hold one qk-norm pair, {pairs}: but got {found}")
  return sizes["DM"], sizes["N"]
