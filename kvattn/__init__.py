"""kvattn: functional JAX attention with an explicit key/value cache.

A prompt goes through `prefill` in one pass at any cache index; `decode_step`
appends one token. The cache is a pytree of arrays and its index a traced
int32, so each function compiles once and serves every position.
"""

from kvattn import masks
from kvattn import rope
from kvattn.attention import cached_attention
from kvattn.cache import KVCache
from kvattn.cache import init_cache
from kvattn.cache import overflowed
from kvattn.cache import token_positions
from kvattn.layer import decode_step
from kvattn.layer import prefill
from kvattn.params import init_params

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "cached_attention",
    "decode_step",
    "init_cache",
    "init_params",
    "masks",
    "overflowed",
    "prefill",
    "rope",
    "token_positions",
]
