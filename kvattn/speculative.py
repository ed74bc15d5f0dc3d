"""Greedy speculative decoding: a small draft model proposes, the target verifies.

Both models are `step_fn`s, the contract of `kvattn.decoding` (as for
`kvattn.generate`): `(params, caches, tokens [B, T], mask [B, T] | None) ->
(logits [B, T, V], caches)`; the prompts, eos_id and pad_id follow its rules
too. Each round:

  1. The draft proposes k tokens d1..dk greedily, in k calls: the first feeds
     the two newest tokens (prev, last), each next one the draft before it.
  2. The target scores [last, d1, ..., dk] in ONE call (T = k + 1), giving its
     own greedy choice g0..gk after each prefix.
  3. A row accepts the longest prefix of drafts that the target agrees with
     (d_i == g_{i-1}), n of them, and then takes the target's own next token
     g_n: every round adds n + 1 tokens, between 1 and k + 1, and they are
     exactly g0..gn, the target's own greedy choices.
  4. Both caches are rewound by the k - n rejected tokens of each row
     (`kvattn.rewind`, per row), as if they had never been seen.

So the output is the target's greedy output, token for token; the draft only
decides how many target tokens each call yields. The target's caches hold
everything but `last`; the draft's everything but `prev` and `last`, which is
why its first call of a round feeds two tokens: when all k drafts were
accepted, dk itself was never fed to the draft, and it is `prev` then.

Batches: rows accept different numbers of tokens, and a cache's slots are
shared by the batch, so a row that accepts fewer leaves invalid slots behind
(holes, like padding) until the round's longest row. Any B >= 1 works; the
caches need more room for B > 1 (`required_max_len`). Rows that reach M keep
running with the others; their extra tokens are dropped.

Compiled pieces: `start` (both prefills), `advance` (one round) and `finish`
(rounds in a `lax.while_loop` until every row has M tokens), each once per
shape and static setting (the step_fns and k); `speculative_generate` runs
`start` then `finish`.

Shape legend:
  B: batch size
  P: prompt length (padded)
  T: tokens per model call
  V: vocabulary size
  M: max_new_tokens
  k: num_draft, the tokens the draft proposes per round (lower case: a count,
     not the kv heads K of the attention modules)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import cache_ops
from kvattn import decoding
from kvattn import masks
from kvattn import sampling
from kvattn._cache_tree import check_caches, map_caches
from kvattn._checks import check_positive_ints
from kvattn.decoding import StepFn


class Stats(NamedTuple):
  """How the draft fared; int32 scalars, counted over rows still short of M.

  Fields:
    rounds: rounds run (one target call each, after the prefill).
    drafted: draft tokens proposed, k per row per round.
    accepted: draft tokens the target agreed with.
  """

  rounds: jax.Array
  drafted: jax.Array
  accepted: jax.Array

  @property
  def acceptance_rate(self) -> float:
    """accepted / drafted (0.0 when nothing was drafted)."""
    return float(self.accepted) / max(int(self.drafted), 1)


class SpecState(NamedTuple):
  """The loop's carry; every leaf is an array.

  Fields:
    tokens: int32 `[B, M + k]`; columns `[:count]` are generated tokens (a
      round writes k + 1 columns, so k columns of room follow M).
    count: int32 `[B]` tokens generated per row.
    prev: int32 `[B]` the token before `last` (the prompt's last at first).
    last: int32 `[B]` the newest token, not fed to either model yet.
    target_caches: the target's caches, holding everything but `last`.
    draft_caches: the draft's caches, holding everything but `prev`, `last`.
    stats: the `Stats` so far.
  """

  tokens: jax.Array
  count: jax.Array
  prev: jax.Array
  last: jax.Array
  target_caches: Any
  draft_caches: Any
  stats: Stats


def required_max_len(batch_size: int, prompt_len: int, max_new_tokens: int, num_draft: int) -> int:
  """The cache capacity S that both models' caches need.

  With B = 1 every round leaves its caches exactly as long as the tokens kept:
  P + M + k - 1 slots (the last round writes k + 1 past P + M - 2). With
  B > 1 a round advances the shared slots by the most any row kept, up to
  k + 1, and there are at most M - 1 rounds: P + (M - 1)(k + 1).
  """
  check_positive_ints(batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                      num_draft=num_draft)
  if batch_size == 1:
    return prompt_len + max_new_tokens + num_draft - 1
  return prompt_len + (max_new_tokens - 1) * (num_draft + 1)


@functools.partial(
    jax.jit, static_argnames=("target_step_fn", "draft_step_fn", "max_new_tokens", "num_draft"))
def start(target_step_fn: StepFn, target_params: Any, target_caches: Any, draft_step_fn: StepFn,
          draft_params: Any, draft_caches: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array, *,
          max_new_tokens: int, num_draft: int) -> SpecState:
  """Prefills both models and takes the target's first token (column 0).

  The draft gets the prompt without each row's last real token (masked out):
  that token is `prev`, fed with `last` by the first round.
  """
  b, p = prompt_tokens.shape
  tokens = prompt_tokens.astype(jnp.int32)
  last_index = decoding.last_real(prompt_mask)  # [B], not column P - 1 under right padding.
  logits, target_caches = target_step_fn(target_params, target_caches, tokens, prompt_mask)
  first = sampling.greedy(decoding.take_at(logits, last_index))
  prev = decoding.take_at(tokens, last_index)
  column = lax.broadcasted_iota(jnp.int32, (b, p), 1)
  draft_logits, draft_caches = draft_step_fn(draft_params, draft_caches, tokens,
                                             prompt_mask & (column != last_index[:, None]))
  if logits.shape[-1] != draft_logits.shape[-1]:  # Drafts must be the target's tokens.
    raise ValueError(f"the target's vocabulary size should be the draft's, "
                     f"V={draft_logits.shape[-1]}: but got {logits.shape[-1]}")
  out = jnp.zeros((b, max_new_tokens + num_draft), jnp.int32).at[:, 0].set(first)
  zero = jnp.zeros((), jnp.int32)
  return SpecState(tokens=out, count=jnp.ones(
      (b,), jnp.int32), prev=prev, last=first, target_caches=target_caches,
                   draft_caches=draft_caches, stats=Stats(rounds=zero, drafted=zero, accepted=zero))


@functools.partial(jax.jit, static_argnames=("target_step_fn", "draft_step_fn", "num_draft"))
def advance(target_step_fn: StepFn, target_params: Any, draft_step_fn: StepFn, draft_params: Any,
            state: SpecState, *, num_draft: int, eos_id: Any = None) -> SpecState:
  """One round: k draft calls, one target call of k + 1 tokens, then the rewinds.

  Rows with M tokens, or (with `eos_id`) with an EOS among their tokens, keep
  what they have.
  """
  k = num_draft
  m = state.tokens.shape[1] - k
  # 1. Draft: [prev, last] -> d1, then d_i -> d_{i+1}.
  logits, draft_caches = draft_step_fn(draft_params, state.draft_caches,
                                       jnp.stack([state.prev, state.last], axis=1), None)
  first = sampling.greedy(logits[:, -1])

  def draft_one(carry, _):
    caches, token = carry
    logits, caches = draft_step_fn(draft_params, caches, token[:, None], None)
    token = sampling.greedy(logits[:, 0])
    return (caches, token), token

  (draft_caches, _), rest = lax.scan(draft_one, (draft_caches, first), None, length=k - 1)
  drafts = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, k]
  # 2. Target: one call over [last, d1..dk] -> its choices g0..gk.
  verify = jnp.concatenate([state.last[:, None], drafts], axis=1)  # [B, k + 1]
  logits, target_caches = target_step_fn(target_params, state.target_caches, verify, None)
  chosen = sampling.greedy(logits)  # [B, k + 1]
  # 3. Accept the longest agreeing prefix: n drafts, then g_n.
  agree = (drafts == chosen[:, :k]).astype(jnp.int32)
  n = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # [B] in [0, k]
  active = _running(state, m, eos_id)
  written = jax.vmap(lambda row, new, at: lax.dynamic_update_slice(row, new, (at,)))(state.tokens,
                                                                                     chosen,
                                                                                     state.count)
  # 4. Both caches drop the k - n rejected drafts of each row.
  rejected = k - n
  stats = state.stats
  return SpecState(
      tokens=jnp.where(active[:, None], written, state.tokens),
      count=state.count + jnp.where(active, n + 1, 0),
      prev=decoding.take_at(verify, n),
      last=decoding.take_at(chosen, n),
      target_caches=map_caches(cache_ops.rewind, target_caches, rejected),
      draft_caches=map_caches(cache_ops.rewind, draft_caches, rejected),
      stats=Stats(rounds=stats.rounds + 1,
                  drafted=stats.drafted + k * jnp.sum(active, dtype=jnp.int32),
                  accepted=stats.accepted + jnp.sum(jnp.where(active, n, 0))),
  )


@functools.partial(jax.jit, static_argnames=("target_step_fn", "draft_step_fn", "num_draft"))
def finish(target_step_fn: StepFn, target_params: Any, draft_step_fn: StepFn, draft_params: Any,
           state: SpecState, *, num_draft: int, eos_id: Any = None) -> SpecState:
  """Rounds in a `lax.while_loop` until every row has M tokens or an EOS."""
  m = state.tokens.shape[1] - num_draft

  def body(s):
    return advance(target_step_fn, target_params, draft_step_fn, draft_params, s,
                   num_draft=num_draft, eos_id=eos_id)

  return lax.while_loop(lambda s: jnp.any(_running(s, m, eos_id)), body, state)


def _running(state: SpecState, m: int, eos_id) -> jax.Array:
  """bool `[B]`: rows short of M tokens with no EOS among them yet."""
  running = state.count < m
  if eos_id is None:
    return running
  column = lax.broadcasted_iota(jnp.int32, state.tokens.shape, 1)
  ended = decoding.is_eos(state.tokens, eos_id) & (column < state.count[:, None])
  return running & ~jnp.any(ended, axis=1)


@jax.jit
def _pad_after_eos(tokens: jax.Array, eos_id: Any, pad_id: jax.Array) -> jax.Array:
  """tokens `[B, M]` with every column after a row's first EOS set to pad_id."""
  after = masks.real_before(decoding.is_eos(tokens, eos_id)) > 0  # An EOS strictly before.
  return jnp.where(after, pad_id, tokens)


def speculative_generate(target_step_fn: StepFn, target_params: Any, target_caches: Any,
                         draft_step_fn: StepFn, draft_params: Any, draft_caches: Any,
                         prompt_tokens: jax.Array, prompt_mask: jax.Array | None = None, *,
                         max_new_tokens: int, num_draft: int,
                         eos_id: int | Sequence[int] | None = None,
                         pad_id: int = 0) -> tuple[jax.Array, Stats]:
  """Generates M greedy tokens per prompt with the target, k drafted per round.

  The tokens are those of `kvattn.generate` with the target alone and a
  greedy sampler (with the same eos_id and pad_id); only the number of target
  calls changes.

  Args:
    target_step_fn: the target model, `(params, caches, tokens [B, T], mask
      [B, T] | None) -> (logits [B, T, V], caches)`. Static: pass the same
      object each call (`transformer.step_fn(config)` is).
    target_params: the target's params (any pytree).
    target_caches: the target's caches: a pytree of `KVCache`s (stacked ones
      too) with B rows and max_len >= `required_max_len(B, P, M, k)`.
    draft_step_fn: the draft model, the same contract and vocabulary.
    draft_params: the draft's params.
    draft_caches: the draft's caches, with the same room.
    prompt_tokens: int `[B, P]` prompts, padded on the left or the right (an
      array, or nested lists of ints, as for `kvattn.generate`).
    prompt_mask: bool `[B, P]`, True for real tokens; every row needs one.
      None: every token is real.
    max_new_tokens: M >= 1.
    num_draft: k >= 1, the draft tokens per round.
    eos_id: a row is done once it produces this token, or any of these
      tokens (a list of ints); None: never. As in `kvattn.generate`.
    pad_id: fills each row's tokens after its EOS.

  Returns:
    `(tokens [B, M] int32, stats)`: the generated tokens (`pad_id` after a
    row's EOS) and a `Stats`.
  """
  prompt_tokens, prompt_mask = decoding.as_prompts(prompt_tokens, prompt_mask)
  decoding.check_eos(eos_id)
  decoding.check_pad(pad_id)
  b, p = decoding.check_prompts(prompt_tokens, prompt_mask)
  check_positive_ints(max_new_tokens=max_new_tokens, num_draft=num_draft)
  decoding.check_step_fn(target_step_fn, "target_step_fn")
  decoding.check_step_fn(draft_step_fn, "draft_step_fn")
  needed = required_max_len(b, p, max_new_tokens, num_draft)
  m, k = max_new_tokens, num_draft
  why = (f"P + M + k - 1 = {p} + {m} + {k} - 1"
         if b == 1 else f"P + (M - 1)(k + 1) = {p} + {m - 1} * {k + 1}")
  check_caches("target_caches", target_caches, b, needed, why, rewind=num_draft)
  check_caches("draft_caches", draft_caches, b, needed, why, rewind=num_draft)
  for step_fn, caches in ((target_step_fn, target_caches), (draft_step_fn, draft_caches)):
    decoding.check_prompt_values(step_fn, caches, prompt_tokens, prompt_mask, max_new_tokens)
  state = start(target_step_fn, target_params, target_caches, draft_step_fn, draft_params,
                draft_caches, prompt_tokens, prompt_mask, max_new_tokens=max_new_tokens,
                num_draft=num_draft)
  state = finish(target_step_fn, target_params, draft_step_fn, draft_params, state,
                 num_draft=num_draft, eos_id=eos_id)
  tokens = state.tokens[:, :max_new_tokens]
  if eos_id is not None:
    tokens = _pad_after_eos(tokens, eos_id, jnp.asarray(pad_id, jnp.int32))
  return tokens, state.stats
