"""A layer loop over a stack of layers' pages that updates them in place.

A model's layers share one `PagedCache` stack (`init_paged_cache(...,
num_layers=L)`): pages `[L, NP, PS, K, H]`, one page table, lengths and refs.
`scan_layers` carries the stack through the layers and hands each a layer
view (`kvattn.paged.layer_view`), so each layer's attention gathers its
pages from the stack and scatters its new tokens into it where they are: a
step never copies the pool (as `kvattn.scan_layers` for dense stacks).

Shape legend:
  L: number of layers
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from kvattn.paged.cache import PagedCache, layer_view, stack_of


def scan_layers(body: Callable[[Any, Any, PagedCache], tuple[Any, PagedCache]], carry: Any,
                layer_params: Any, stack: PagedCache) -> tuple[Any, PagedCache]:
  """Runs `body` once per layer over a stack of layers' pages: `(carry, stack)`.

    def block(h, p, cache):
      a, cache = kvattn.paged.paged_prefill(p["attn"], cache, norm(h), seq_slots, cu_q_lens,
                                            num_seqs, rope_base=...)
      return h + a + mlp(p["mlp"], norm(h + a)), cache

    h, stack = kvattn.paged.scan_layers(block, h, params["layers"], stack)

  Every layer attends from the bookkeeping the stack had before the loop
  (each layer's tokens are at the same positions: the lengths must not
  advance from one layer to the next); the stack returned has the pages
  every layer wrote and the lengths and `exhausted` flags of the step's one
  write (the same in every layer: they depend on the page table and the
  batch only). Reserve the step's pages on the stack before the loop.

  Args:
    body: one layer, `(carry, params, cache) -> (carry, cache)`: cache is a
      layer view, which `paged_prefill` and `paged_attention` take; return
      the view they returned. It must only attend: its page table and refs
      are dropped.
    carry: what the layers thread through (the activations), any pytree.
    layer_params: a pytree whose leaves have a leading L axis (run under
      `lax.scan`), or a list or tuple of L per-layer pytrees (run unrolled).
    stack: a `PagedCache` with page leaves `[L, ...]` (`num_layers=L`).

  Returns:
    `(carry, stack)` after the L layers.
  """
  if not isinstance(stack, PagedCache):
    raise TypeError(f"stack should be a kvattn.paged.PagedCache: but got {type(stack).__name__}")
  layer_view(stack, 0)  # Checks that it is a stack.
  num_layers = stack.k_pages.shape[0]
  unrolled = isinstance(layer_params, (list, tuple))
  sizes = {len(layer_params)} if unrolled else {
      x.shape[0] if x.ndim else None for x in jax.tree.leaves(layer_params)
  }
  if sizes != {num_layers}:
    raise ValueError(f"layer_params should have one layer per layer of the stack (k_pages "
                     f"(L, NP, PS, K, H)={stack.k_pages.shape}): but got leading sizes "
                     f"{sorted(sizes, key=str)}")
  before = stack

  def one(carry, stack, params, i):
    view = stack._replace(lengths=before.lengths, exhausted=before.exhausted,
                          page_table=before.page_table, refs=before.refs, layer=i)
    carry, view = body(carry, params, view)
    return carry, stack_of(view)

  if unrolled:
    for i, params in enumerate(layer_params):
      carry, stack = one(carry, stack, params, jnp.asarray(i, jnp.int32))
    return carry, stack

  def step(state, xs):
    return one(*state, *xs), None

  layers = jnp.arange(num_layers, dtype=jnp.int32)
  (carry, stack), _ = lax.scan(step, (carry, stack), (layer_params, layers))
  return carry, stack
