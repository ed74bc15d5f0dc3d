"""A paged key/value cache and ragged batches of prefill chunks and decode tokens, as functions.

Keys and values live in fixed-size pages of one pool, each sequence slot has
a page table, and one call (`paged_attention`, or `paged_prefill` with the
projections) runs a ragged batch: the new tokens of several sequences
concatenated, prefill chunks beside single decode tokens, described by the
metadata of the ragged paged attention kernels (`seq_slots`, `cu_q_lens`,
`num_seqs`). Page management (`reserve`, `release`, `fork`) is jittable
and never raises under `jit`. See docs/paged.md.

  * `kvattn.paged.cache`: the `PagedCache` pytree and its checks.
  * `kvattn.paged.pages`: page management: reserve, release, fork.
  * `kvattn.paged.batch`: the ragged batch's metadata, its checks, the write.
  * `kvattn.paged.attention`: `paged_attention` and the backend records.
  * `kvattn.paged.xla`: the portable kernel.
  * `kvattn.paged.layer`: `paged_prefill`, the attention layer.
  * `kvattn.paged.stack`: a model's layers over one stack, in place.
  * `kvattn.paged.sharding`: the cache's shardings.
"""

from kvattn.paged.attention import BACKENDS
from kvattn.paged.attention import PagedBackend
from kvattn.paged.attention import paged_attention
from kvattn.paged.cache import NO_PAGE
from kvattn.paged.cache import PagedCache
from kvattn.paged.cache import init_paged_cache
from kvattn.paged.cache import layer_view
from kvattn.paged.cache import stack_of
from kvattn.paged.pages import fork
from kvattn.paged.pages import pages_in_use
from kvattn.paged.pages import release
from kvattn.paged.pages import reserve
from kvattn.paged.layer import paged_prefill
from kvattn.paged.layer import token_mask
from kvattn.paged.layer import token_positions
from kvattn.paged.sharding import paged_cache_logical_axes
from kvattn.paged.sharding import paged_cache_shardings
from kvattn.paged.sharding import paged_cache_specs
from kvattn.paged.stack import scan_layers

__all__ = [
    "BACKENDS",
    "NO_PAGE",
    "PagedBackend",
    "PagedCache",
    "fork",
    "init_paged_cache",
    "layer_view",
    "pages_in_use",
    "paged_attention",
    "paged_cache_logical_axes",
    "paged_cache_shardings",
    "paged_cache_specs",
    "paged_prefill",
    "release",
    "reserve",
    "scan_layers",
    "stack_of",
    "token_mask",
    "token_positions",
]
