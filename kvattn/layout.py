"""The layout of each pytree, written once: dimensions, dtype and logical axes per leaf.

`kvattn.init_cache` and `kvattn.init_params` build their leaves from these
tables, the boundary checks compare against them, and `kvattn.sharding`
derives every PartitionSpec from them. Changing a field's shape happens here.

Dimensions are shape letters; each letter is one logical axis (the names the
sharding rules map to mesh axes):

  B: "batch"       batch size
  S: "sequence"    cache capacity (max_len)
  N: "heads"       query heads
  K: "kv_heads"    key/value heads
  H: "head_dim"    head dimension
  DM: "embed"      model width

and for the paged cache (`kvattn.paged`, the PAGED_CACHE table):

  NP: "pages"         pages in the pool
  PS: "page_slots"   tokens per page (page_size)
  SQ: "seq_slots"    sequence slots (max_seqs)
  PPS: "seq_pages"   pages per sequence (pages_per_seq)
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

LOGICAL_AXES = {
    "B": "batch",
    "S": "sequence",
    "N": "heads",
    "K": "kv_heads",
    "H": "head_dim",
    "DM": "embed",
    "NP": "pages",
    "PS": "page_slots",
    "SQ": "seq_slots",
    "PPS": "seq_pages",
}


class Field(NamedTuple):
  """One leaf of a pytree.

  Attributes:
    dims: the shape, in letters of `LOGICAL_AXES`.
    dtype: a fixed dtype name, or None for the pytree's own (the cache's
      storage dtype, the params' dtype).
    optional: the leaf may be absent (None in a cache, a missing key in
      params): int8 scales, a ring cache's bookkeeping, biases.
    fan_in: the dims an input is contracted over (params' initialiser).
    feature: for an optional cache leaf, the kind of cache that has it:
      "int8" (quantised) or "window" (a sliding-window ring).
  """

  dims: tuple[str, ...]
  dtype: str | None = None
  optional: bool = False
  fan_in: tuple[str, ...] = ()
  feature: str | None = None

  def legend(self) -> str:
    """The symbolic shape, e.g. "(B, S, K, H)"."""
    return "(" + ", ".join(self.dims) + ("," if len(self.dims) == 1 else "") + ")"

  def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The concrete shape for the sizes of the letters."""
    return tuple(sizes[d] for d in self.dims)

  def logical_axes(self) -> tuple[str, ...]:
    return tuple(LOGICAL_AXES[d] for d in self.dims)


# The KVCache's fields, in order (see kvattn.cache.KVCache).
CACHE: dict[str, Field] = {
    "k": Field(("B", "S", "K", "H")),
    "v": Field(("B", "S", "K", "H")),
    "valid": Field(("B", "S"), "bool"),
    "lengths": Field(("B",), "int32"),
    "index": Field((), "int32"),
    "overflow": Field((), "bool"),
    "k_scale": Field(("B", "S", "K"), "float32", optional=True, feature="int8"),
    "v_scale": Field(("B", "S", "K"), "float32", optional=True, feature="int8"),
    # Ring caches only (init_cache(..., window=W)): S is then the ring's slots.
    "positions": Field(("B", "S"), "int32", optional=True, feature="window"),
}

# The KVCache's static fields: Python ints (None for a linear cache), part of
# the pytree's structure rather than leaves, so that code paths and checks may
# depend on them under jit. A ring cache has both.
CACHE_STATIC: dict[str, str] = {
    "window": "W, the ring's sliding window",
    "max_positions": "the bound on a ring's positions (init_cache's max_len)",
}

# The attention params (see kvattn.params): Flax DenseGeneral kernels, biases,
# and the RMSNorm scales of q and k (qk-norm, before RoPE): per head (Qwen3,
# Gemma 3: "head") or over the whole projection (OLMo 2: "projection").
PARAMS: dict[str, Field] = {
    "wq": Field(("DM", "N", "H"), fan_in=("DM",)),
    "wk": Field(("DM", "K", "H"), fan_in=("DM",)),
    "wv": Field(("DM", "K", "H"), fan_in=("DM",)),
    "wo": Field(("N", "H", "DM"), fan_in=("N", "H")),
    "bq": Field(("N", "H"), optional=True, feature="bias"),
    "bk": Field(("K", "H"), optional=True, feature="bias"),
    "bv": Field(("K", "H"), optional=True, feature="bias"),
    "bo": Field(("DM",), optional=True, feature="bias"),
    "q_norm": Field(("H",), optional=True, feature="head"),
    "k_norm": Field(("H",), optional=True, feature="head"),
    "q_norm_proj": Field(("N", "H"), optional=True, feature="projection"),
    "k_norm_proj": Field(("K", "H"), optional=True, feature="projection"),
}

# The qk-norm kinds: the params each one needs.
QK_NORMS: dict[str, tuple[str, str]] = {
    "head": ("q_norm", "k_norm"),
    "projection": ("q_norm_proj", "k_norm_proj"),
}

# The PagedCache's fields, in order (see kvattn.paged.PagedCache): pages of
# PS tokens in a pool of NP, a page table and counters per sequence slot, a
# reference count per page. Its sizes are the leaves' shapes (static under
# jit), so it has no static fields.
PAGED_CACHE: dict[str, Field] = {
    "k_pages": Field(("NP", "PS", "K", "H")),
    "v_pages": Field(("NP", "PS", "K", "H")),
    "page_table": Field(("SQ", "PPS"), "int32"),
    "lengths": Field(("SQ",), "int32"),
    "refs": Field(("NP",), "int32"),
    "exhausted": Field(("SQ",), "bool"),
    "k_scale": Field(("NP", "PS", "K"), "float32", optional=True, feature="int8"),
    "v_scale": Field(("NP", "PS", "K"), "float32", optional=True, feature="int8"),
}
