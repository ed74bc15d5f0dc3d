"""kvattn: functional JAX attention with an explicit key/value cache.

A prompt goes through `prefill` in one pass at any cache index; `decode_step`
appends one token; `self_attention` is the same layer without a cache, for
training. The cache is a pytree of arrays and its index a traced
int32, so each function compiles once and serves every position.
"""

from kvattn import beam_search
from kvattn import decoding
from kvattn import generation
from kvattn import masks
from kvattn import paged
from kvattn import quant
from kvattn import rope
from kvattn import sampling
from kvattn import sharding
from kvattn import speculative
from kvattn.attention import cached_attention
from kvattn.attention import dot_product_attention
from kvattn.cache import KVCache
from kvattn.cache import init_cache
from kvattn.cache import layer_view
from kvattn.cache import overflowed
from kvattn.cache import stack_of
from kvattn.cache import token_positions
from kvattn.cache_ops import reorder
from kvattn.cache_ops import rewind
from kvattn.generation import Generation
from kvattn.generation import generate
from kvattn.generation import generate_stream
from kvattn.layer import decode_step
from kvattn.layer import prefill
from kvattn.layer import self_attention
from kvattn.paged import PagedCache
from kvattn.paged import init_paged_cache
from kvattn.paged import paged_attention
from kvattn.paged import paged_prefill
from kvattn.params import init_params
from kvattn.stack import scan_layers

__version__ = "0.5.0"

__all__ = [
    "Generation",
    "KVCache",
    "PagedCache",
    "beam_search",
    "cached_attention",
    "decode_step",
    "decoding",
    "dot_product_attention",
    "generate",
    "generate_stream",
    "generation",
    "init_cache",
    "init_paged_cache",
    "init_params",
    "layer_view",
    "masks",
    "overflowed",
    "paged",
    "paged_attention",
    "paged_prefill",
    "prefill",
    "quant",
    "reorder",
    "rewind",
    "rope",
    "sampling",
    "scan_layers",
    "self_attention",
    "sharding",
    "speculative",
    "stack_of",
    "token_positions",
]
