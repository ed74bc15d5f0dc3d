"""The paged key/value cache: a pool of pages and a page table per sequence slot.

Keys and values live in NP pages of PS tokens each. Sequence slot `s` holds
`lengths[s]` tokens; token `t` of it is in page `page_table[s, t // PS]` at
offset `t % PS`. `kvattn.paged.pages` hands pages out (`reserve`), takes
them back (`release`) and shares them (`fork`, reference counts in `refs`).
This module holds the pytree, its constructor, and the checks every paged
function shares.

Shape legend:
  NP: pages in the pool (num_pages)
  PS: tokens per page (page_size)
  SQ: sequence slots (max_seqs)
  PPS: pages per sequence slot (pages_per_seq); a slot holds at most PPS * PS tokens
  B: sequences listed in one call (seq_slots)
  K: number of key/value heads
  H: head dimension
  L: layers of a model, in a stack (`init_paged_cache(..., num_layers=L)`)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn import layout
from kvattn._checks import check_positive_ints, check_shape, is_concrete, is_int

# The page table's entry for a page not allocated.
NO_PAGE = -1

# The leaves a stack of layers keeps per layer (leading L axis); the rest,
# the bookkeeping, is kept once for every layer.
PAGE_LEAVES = ("k_pages", "v_pages", "k_scale", "v_scale")


class PagedCache(NamedTuple):
  """Pages of keys and values, and the bookkeeping of the sequences that own them.

  A pytree of arrays (a NamedTuple: `cache._replace(...)` builds a modified
  copy); functions return a new one. Its sizes are its leaves' shapes, static
  under `jit` like every shape, so it has no static fields.

  A model's layers share one cache as a stack (`init_paged_cache(...,
  num_layers=L)`): the page leaves (`PAGE_LEAVES`) get a leading L axis, the
  bookkeeping is kept once, since every layer writes the same tokens into
  the same pages. `reserve`, `release` and `fork` take the stack as they
  take one layer's cache; attention takes a layer view (`layer_view`).

  Fields:
    k_pages: [NP, PS, K, H] cached keys (after RoPE, when RoPE is used).
    v_pages: [NP, PS, K, H] cached values.
    page_table: [SQ, PPS] int32, the pages of each sequence slot in order:
      entries [0, n) are pages, the rest `NO_PAGE` (-1).
    lengths: [SQ] int32, tokens cached per slot (the position of its next
      token).
    refs: [NP] int32, the slots whose table holds each page; 0 = free.
    exhausted: [SQ] bool, sticky until `release`: a write of the slot found
      no page (not reserved, or past PPS * PS): nothing of that call, and
      nothing later, was written for it.
    k_scale: [NP, PS, K] float32 scale of each int8 key vector, or None when
      the pages are not quantised (see `kvattn.quant`).
    v_scale: [NP, PS, K] float32, or None.
    layer: None, except in a layer view (`layer_view`): an int32 scalar, the
      layer of a stack (page leaves `[L, NP, ...]`) that attention reads and
      writes in place.
  """

  k_pages: jax.Array
  v_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  refs: jax.Array
  exhausted: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None
  layer: jax.Array | None = None

  @property
  def num_pages(self) -> int:
    """NP, the pages in the pool."""
    return self.k_pages.shape[-4]

  @property
  def page_size(self) -> int:
    """PS, the tokens per page."""
    return self.k_pages.shape[-3]

  @property
  def num_kv_heads(self) -> int:
    return self.k_pages.shape[-2]

  @property
  def head_dim(self) -> int:
    return self.k_pages.shape[-1]

  @property
  def max_seqs(self) -> int:
    """SQ, the sequence slots."""
    return self.page_table.shape[-2]

  @property
  def pages_per_seq(self) -> int:
    """PPS, the most pages one slot can hold."""
    return self.page_table.shape[-1]

  @property
  def capacity(self) -> int:
    """PPS * PS, the most tokens one slot can hold."""
    return self.pages_per_seq * self.page_size

  @property
  def quantized(self) -> bool:
    """True when the pages are int8 with per-token, per-head scales."""
    return self.k_scale is not None


def init_paged_cache(
    num_pages: int,
    page_size: int,
    max_seqs: int,
    pages_per_seq: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    quantized: bool = False,
    num_layers: int | None = None,
) -> PagedCache:
  """Returns an empty paged cache: every page free, every slot empty.

  Args:
    num_pages: NP, the pages in the pool (the memory: NP * PS tokens in all).
    page_size: PS, the tokens per page.
    max_seqs: SQ, the sequence slots.
    pages_per_seq: PPS, the pages a slot may hold: a sequence holds at most
      PPS * PS tokens (a pool smaller than that is fine: it is shared).
    num_kv_heads: K.
    head_dim: H.
    dtype: storage dtype of the pages (e.g. jnp.bfloat16). Attention itself
      is always computed in float32.
    quantized: int8 pages with a float32 scale per token and kv head, as
      `kvattn.init_cache(..., quantized=True)`; `dtype` must then stay float32.
    num_layers: None for one layer's cache; L for a stack of L layers'
      pages (`[L, NP, PS, K, H]`, scales `[L, NP, PS, K]`) sharing one page
      table, lengths and refs (the class doc).

  Returns:
    A `PagedCache` with k_pages, v_pages `[NP, PS, K, H]` (`[L, NP, PS, K, H]`)
    of zeros, the page table all `NO_PAGE`, lengths, refs 0, nothing
    exhausted.
  """
  check_positive_ints(num_pages=num_pages, page_size=page_size, max_seqs=max_seqs,
                      pages_per_seq=pages_per_seq, num_kv_heads=num_kv_heads, head_dim=head_dim)
  if num_layers is not None:
    check_positive_ints(num_layers=num_layers)
  if not isinstance(quantized, bool):
    raise ValueError(f"quantized should be a bool: but got {quantized!r}")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype should be a floating dtype: but got {dtype}")
  if quantized and dtype != jnp.float32:
    raise ValueError(f"dtype should be float32 when quantized=True (pages are stored as int8 "
                     f"and dequantised to float32): but got {dtype}")
  sizes = dict(NP=num_pages, PS=page_size, SQ=max_seqs, PPS=pages_per_seq, K=num_kv_heads,
               H=head_dim)
  storage = jnp.dtype(jnp.int8) if quantized else dtype
  leaves = {}
  for name, field in layout.PAGED_CACHE.items():
    if field.optional and not quantized:
      leaves[name] = None
    else:
      fill = NO_PAGE if name == "page_table" else 0
      lead = (num_layers,) if num_layers is not None and name in PAGE_LEAVES else ()
      leaves[name] = jnp.full(lead + field.shape(sizes), fill, field.dtype or storage)
  return PagedCache(**leaves)


def check_paged_cache(cache) -> None:
  """Raises TypeError/ValueError unless `cache` is a well-formed `PagedCache` (kvattn.layout)."""
  if not isinstance(cache, PagedCache):
    raise TypeError(f"cache should be a kvattn.paged.PagedCache: but got {type(cache).__name__}")
  pages = layout.PAGED_CACHE["k_pages"]
  shape = getattr(cache.k_pages, "shape", None)
  if shape is None or len(shape) not in (4, 5):
    raise ValueError(f"cache.k_pages shape should be {pages.legend()} (or (L, NP, PS, K, H), a "
                     f"stack of layers): but got {shape}")
  lead = tuple(shape[:-4])
  if cache.layer is not None and (not lead or getattr(cache.layer, "shape", None) != ()):
    raise ValueError(f"cache.layer should be None, or an int32 scalar with k_pages (L, NP, PS, K, "
                     f"H) (a layer view): but got layer {getattr(cache.layer, 'shape', None)} "
                     f"and k_pages {shape}")
  table = getattr(cache.page_table, "shape", None)
  if table is None or len(table) != 2:
    raise ValueError(f"cache.page_table shape should be (SQ, PPS): but got {table}")
  sizes = dict(zip(pages.dims, shape[-4:]), SQ=table[0], PPS=table[1])
  int8 = cache.k_pages.dtype == jnp.int8
  if not (int8 or jnp.issubdtype(cache.k_pages.dtype, jnp.floating)):
    raise ValueError(f"cache.k_pages dtype should be a floating dtype or int8: but got "
                     f"{cache.k_pages.dtype}")
  for name, field in layout.PAGED_CACHE.items():
    x = getattr(cache, name)
    if field.feature == "int8" and (x is None) == int8:
      want = f"a float32 {field.legend()} array" if int8 else "None"
      raise ValueError(f"cache.{name} should be {want} for a {cache.k_pages.dtype} cache: but "
                       f"got {getattr(x, 'shape', x)}")
    if x is None:
      continue
    if lead and name in PAGE_LEAVES:
      check_shape(f"cache.{name}", x, "(L, " + field.legend()[1:], lead + field.shape(sizes))
    else:
      check_shape(f"cache.{name}", x, field.legend(), field.shape(sizes))
    dtype = jnp.dtype(field.dtype) if field.dtype else cache.k_pages.dtype
    if x.dtype != dtype:
      raise ValueError(f"cache.{name} dtype should be {dtype}: but got {x.dtype}")


def check_one_layer(cache: PagedCache) -> None:
  """Raises ValueError for a stack of layers' pages that is not a layer view (attention's input)."""
  if cache.k_pages.ndim == 5 and cache.layer is None:
    raise ValueError(f"cache should be one layer's: but got a stack of {cache.k_pages.shape[0]} "
                     f"layers' pages {cache.k_pages.shape}: pass kvattn.paged.layer_view(stack, "
                     f"layer), or run the layers with kvattn.paged.scan_layers")


def layer_view(stack: PagedCache, layer: int | jax.Array) -> PagedCache:
  """Layer `layer` of a stack, as a cache that attention reads and writes in place.

  `stack` holds L layers' pages (`init_paged_cache(..., num_layers=L)`); the
  view goes wherever a cache does in `paged_attention` and `paged_prefill`,
  which then gather that layer's pages from the stacked buffers and scatter
  its new tokens into them: a layer loop that carries the stack costs one
  layer's reads and writes, never a copy of the pool. `stack_of` turns the
  returned view back into the stack (`kvattn.paged.scan_layers` does both).

  Args:
    stack: a `PagedCache` with page leaves `[L, ...]` and no layer set.
    layer: int32 scalar in [0, L), may be traced.
  """
  check_paged_cache(stack)
  if stack.layer is not None or stack.k_pages.ndim != 5:
    raise ValueError(f"stack should be a stack of layers (k_pages (L, NP, PS, K, H), no layer "
                     f"set): but got k_pages {stack.k_pages.shape} and layer {stack.layer!r}")
  return stack._replace(layer=jnp.asarray(layer, jnp.int32))


def stack_of(view: PagedCache) -> PagedCache:
  """The stack a layer view was made from (with the view's writes): `layer` unset."""
  return view._replace(layer=None)


def check_page_table(cache: PagedCache) -> None:
  """With a concrete cache: raises ValueError unless every page id is in [0, NP) or NO_PAGE."""
  if not is_concrete(cache.page_table):
    return
  table = np.asarray(cache.page_table)
  bad = (table != NO_PAGE) & ((table < 0) | (table >= cache.num_pages))
  if bad.any():
    s, j = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"cache.page_table entries should be page ids in [0, NP={cache.num_pages}) or "
                     f"NO_PAGE ({NO_PAGE}): but got {int(table[s, j])} at [{s}, {j}]")


def check_slots(name: str, slots, max_seqs: int, count=None) -> None:
  """Checks int slots `[B]`; concrete ones (the first `count`) in [0, SQ) and distinct."""
  check_shape(name, slots, "(B,)", (None,))
  if not jnp.issubdtype(slots.dtype, jnp.integer):
    raise ValueError(f"{name} dtype should be an integer dtype: but got {slots.dtype}")
  if not (is_concrete(slots) and is_concrete(count)):
    return
  values = np.asarray(slots)[:slots.shape[0] if count is None else int(count)]
  outside = (values < 0) | (values >= max_seqs)
  if outside.any():
    raise ValueError(f"{name} should be slots in [0, SQ={max_seqs}): but got {values.tolist()}")
  if len(set(values.tolist())) != len(values):
    raise ValueError(f"{name} should be distinct: but got {values.tolist()}")


def check_count(num_seqs, batch: int) -> None:
  """num_seqs: an int or an integer scalar array; concrete, in [0, B]."""
  if is_int(num_seqs):
    value = num_seqs
  elif getattr(num_seqs, "shape", None) == () and jnp.issubdtype(num_seqs.dtype, jnp.integer):
    if not is_concrete(num_seqs):
      return
    value = int(num_seqs)
  else:
    raise ValueError(f"num_seqs should be an int or an integer scalar array: but got "
                     f"{num_seqs!r}")
  if not 0 <= value <= batch:
    raise ValueError(f"num_seqs should be in [0, B={batch}]: but got {value}")


def listed(slots: jax.Array, num_seqs, max_seqs: int) -> jax.Array:
  """bool `[B]`: entries that name a slot, within the first num_seqs, not named before.

  The rule under `jit`, where nothing can be refused: an entry past
  num_seqs, out of range, or repeating an earlier entry's slot is ignored.
  """
  b = slots.shape[0]
  entry = lax.broadcasted_iota(jnp.int32, (b, b), 0)
  before = lax.broadcasted_iota(jnp.int32, (b, b), 1) < entry
  count = jnp.clip(jnp.asarray(num_seqs, jnp.int32), 0, b)
  repeated = jnp.any(before & (slots[None, :] == slots[:, None]), axis=1)
  index = lax.broadcasted_iota(jnp.int32, (b,), 0)
  return (index < count) & (slots >= 0) & (slots < max_seqs) & ~repeated
