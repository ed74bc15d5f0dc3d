"""Drawing one token per row with each row's own settings, in one compiled function.

Every setting is an array with a row axis (`temperature`, `top_k`, `top_p`,
`min_p`, the seed and the output index), so rows of different requests mix
in one call and a new setting never compiles. Row r draws with
`fold_in(PRNGKey(seeds[r]), counts[r])`: its token depends only on its own
logits, settings, seed and output index, never on the other rows.

Shape legend:
  SR: rows drawn in one call
  V: vocabulary size
  TL: most likely alternatives reported per row (static)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import sampling


class Draw(NamedTuple):
  """What `draw` returns, per row.

  Fields:
    tokens: int32 `[SR]` the drawn tokens.
    logprobs: float32 `[SR]` each drawn token's log-probability under the
      model (before temperature and the filters).
    top_ids: int32 `[SR, TL]` the TL most likely tokens, most likely first.
    top_logprobs: float32 `[SR, TL]` their log-probabilities.
  """

  tokens: jax.Array
  logprobs: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array) -> jax.Array:
  """float32 `[SR, V]`: logits / temperature with the filtered-out tokens at -inf.

  In Hugging Face's order: temperature, top-k (0 keeps all; ties with the
  k-th are kept), top-p (1 keeps all), min-p (0 keeps all). The most likely
  token always stays. Rows with temperature 0 are divided by 1 (their draw
  is greedy anyway). The vocabulary is sorted once, and only when some row
  uses top-k or top-p; min-p needs no sort.
  """
  v = logits.shape[-1]
  t = temperature.astype(jnp.float32)[:, None]
  scaled = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
  k = jnp.clip(top_k.astype(jnp.int32), 0, v)[:, None]
  p = top_p.astype(jnp.float32)[:, None]
  q = min_p.astype(jnp.float32)[:, None]

  def sorted_filters(scaled):
    descending = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(k - 1, 0, v - 1), axis=-1)
    kth = jnp.where(k > 0, kth, -jnp.inf)
    # Top-p over what top-k kept, as `sampling.top_p_logits` after `top_k_logits`: the kept
    # logits are a prefix of the sorted ones (ties with the k-th included).
    kept = jnp.where(descending >= kth, descending, -jnp.inf)
    probs = jax.nn.softmax(kept, axis=-1)
    total = jnp.cumsum(probs, axis=-1)
    before = jnp.pad(total[:, :-1], ((0, 0), (1, 0)))
    limit = p * total[:, -1:] * (1 - 4 * jnp.finfo(jnp.float32).eps)
    in_nucleus = (before < limit) | (p >= 1.0)
    nucleus = jnp.min(jnp.where(in_nucleus, kept, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < jnp.maximum(kth, nucleus), -jnp.inf, scaled)

  def min_p_filter(scaled):
    probs = jax.nn.softmax(scaled, axis=-1)
    return jnp.where(probs < q * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, scaled)

  scaled = lax.cond(jnp.any(((k > 0) & (k < v)) | (p < 1.0)), sorted_filters, lambda x: x, scaled)
  return lax.cond(jnp.any(q > 0), min_p_filter, lambda x: x, scaled)


def draw(logits: jax.Array, seeds: jax.Array, counts: jax.Array, temperature: jax.Array,
         top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, num_top: int) -> Draw:
  """Draws one token per row.

  Args:
    logits: `[SR, V]`.
    seeds: uint32 `[SR]`; counts: int32 `[SR]`, the output index of the
      token each row draws.
    temperature, top_p, min_p: float32 `[SR]`; top_k: int32 `[SR]`: as in
      `SamplingParams` (temperature 0: greedy, the first most likely token).
    num_top: static TL >= 0, the alternatives to report.
  """
  logits = logits.astype(jnp.float32)
  model_logprobs = jax.nn.log_softmax(logits, axis=-1)
  greedy = sampling.greedy(logits)

  def sampled(logits):
    scaled = filtered_logits(logits, temperature, top_k, top_p, min_p)

    def one(seed, count, row):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
      return jax.random.categorical(key, row).astype(jnp.int32)

    drawn = jax.vmap(one)(seeds.astype(jnp.uint32), counts.astype(jnp.int32), scaled)
    return jnp.where(temperature > 0, drawn, greedy)

  # A step of greedy rows only (the usual case) filters and draws nothing.
  tokens = lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, logits)
  chosen = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
  if num_top > 0:
    top_logprobs, top_ids = lax.top_k(model_logprobs, num_top)
  else:
    top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
    top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
  return Draw(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
