"""Shardings of a `PagedCache`, from its layout table and the logical-axis rules.

The pages' logical axes are ("pages", "page_slots", "kv_heads", "head_dim")
(`kvattn.layout.PAGED_CACHE`); the page table, lengths, reference counts and
flags have only "seq_slots", "seq_pages" and "pages". With
`kvattn.sharding.DEFAULT_RULES` the pages split over "model" by kv head
(replicated where K does not divide) and everything else is replicated: each
device holds its kv heads of every page, and reads and writes only those.
The paged axes are replicated unless the rules name them.

Shape legend: NP pages, PS tokens per page, SQ sequence slots, PPS pages per
slot, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh, PartitionSpec

from kvattn import layout
from kvattn import sharding
from kvattn.paged.cache import PAGE_LEAVES, PagedCache, check_paged_cache

# The logical axes only the paged cache has, replicated unless the rules name them.
PAGED_AXES = ("pages", "page_slots", "seq_slots", "seq_pages")


def paged_cache_logical_axes(cache: PagedCache) -> PagedCache:
  """A PagedCache whose leaves are the logical axes (a PartitionSpec of names) of cache's."""
  check_paged_cache(cache)
  # A stack of layers' pages: a leading "layers" axis on the page leaves.
  lead = ("layers",) * (cache.k_pages.ndim - 4)
  return PagedCache(
      **{
          name: None if getattr(cache, name) is
                None else PartitionSpec(*(lead if name in PAGE_LEAVES else (
                )), *field.logical_axes()) for name, field in layout.PAGED_CACHE.items()
      })


def paged_cache_specs(cache: PagedCache, mesh: Mesh,
                      rules: sharding.Rules = sharding.DEFAULT_RULES) -> PagedCache:
  """A PagedCache of PartitionSpecs, e.g. k_pages `PartitionSpec(None, None, "model", None)`."""
  named = {entry[0] for entry in rules if isinstance(entry, tuple) and entry}
  rules = tuple(rules) + tuple((axis, None) for axis in PAGED_AXES if axis not in named)
  return sharding.tree_specs(cache, paged_cache_logical_axes(cache), mesh, rules, name="cache")


def paged_cache_shardings(cache: PagedCache, mesh: Mesh,
                          rules: sharding.Rules = sharding.DEFAULT_RULES) -> Any:
  """A PagedCache of NamedShardings, for `jax.jit` in/out_shardings and `jax.device_put`."""
  return sharding.named(paged_cache_specs(cache, mesh, rules), mesh)
