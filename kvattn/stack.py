"""A layer loop over stacked caches that updates them in place.

A model keeps one `KVCache` per layer as a stack: leaves with a leading L
axis. Passing the stack to `lax.scan` as its scanned input and output builds
a new stack on every call, a copy of every layer's cache (decode cost then
grows with the capacity, not the fill). `scan_layers` carries the stack
instead, and hands each layer a layer view (`kvattn.layer_view`) that reads
and writes that layer's slots of the stack where they are.

Shape legend:
  L: number of layers
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from kvattn._cache_tree import _is_cache
from kvattn.cache import layer_view, stack_of


def scan_layers(body: Callable[[Any, Any, Any], tuple[Any, Any]], carry: Any, layer_params: Any,
                caches: Any) -> tuple[Any, Any]:
  """Runs `body` once per layer, its caches updated in place: `(carry, caches)`.

  The rule for any model with stacked caches, e.g. a pre-norm block:

    def block(h, p, cache):
      a, cache = kvattn.prefill(p["attn"], cache, norm(h), mask, rope_base=...)
      return h + a + mlp(p["mlp"], norm(h + a)), cache

    h, caches = kvattn.scan_layers(block, h, params["layers"], caches)

  Under `jax.jit(..., donate_argnums=...)` of the caches the whole model step
  then reads and writes each layer's cache in place: its memory does not grow
  with the capacity, its time grows with the slots filled.

  Args:
    body: one layer, `(carry, params, caches) -> (carry, caches)`: params is
      the layer's slice of `layer_params`, caches is `caches` with each stack
      replaced by a layer view (`kvattn.layer_view`), which `kvattn.prefill`,
      `kvattn.decode_step` and `kvattn.cached_attention` take as a cache.
      Return the views those calls returned.
    carry: what the layers thread through (the activations), any pytree.
    layer_params: a pytree whose leaves have a leading L axis (run under
      `lax.scan`), or a list or tuple of L per-layer pytrees (run unrolled,
      each layer's leaves parameters of their own: bfloat16 weights on
      XLA:CPU are multiplied natively only so; see
      `kvattn.models.transformer.unstack_layers`).
    caches: a `KVCache` stack or a pytree of them, leaves `[L, ...]`.

  Returns:
    `(carry, caches)` after the L layers, the caches with the stacks' structure.
  """
  stacks = jax.tree.leaves(caches, is_leaf=_is_cache)
  if not stacks or not all(_is_cache(c) for c in stacks):
    raise TypeError(f"caches should be a KVCache stack or a pytree of them: but got "
                    f"{type(caches).__name__}")
  sizes = {c.k.shape[0] if c.k.ndim == 5 else None for c in stacks}
  if isinstance(layer_params, (list, tuple)):  # One pytree per layer: unrolled.
    if sizes != {len(layer_params)}:
      raise ValueError(f"caches (k [L, B, S, K, H]) should have one layer per entry of "
                       f"layer_params ({len(layer_params)}): but got leading sizes "
                       f"{sorted(sizes, key=str)}")
    for i, params in enumerate(layer_params):
      views = jax.tree.map(lambda c: layer_view(c, i), caches, is_leaf=_is_cache)
      carry, views = body(carry, params, views)
      caches = jax.tree.map(stack_of, views, is_leaf=_is_cache)
    return carry, caches
  sizes |= {x.shape[0] if x.ndim else None for x in jax.tree.leaves(layer_params)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"caches (k [L, B, S, K, H]) and layer_params should share one leading "
                     f"L axis: but got leading sizes {sorted(sizes, key=str)}")
  (num_layers,) = sizes

  def step(state, xs):
    carry, caches = state
    params, i = xs
    views = jax.tree.map(lambda c: layer_view(c, i), caches, is_leaf=_is_cache)
    carry, views = body(carry, params, views)
    return (carry, jax.tree.map(stack_of, views, is_leaf=_is_cache)), None

  layers = jnp.arange(num_layers, dtype=jnp.int32)
  (carry, caches), _ = lax.scan(step, (carry, caches), (layer_params, layers))
  return carry, caches
