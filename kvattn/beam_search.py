"""Beam search for one prompt with any model whose attention keeps kvattn caches.

The model is a `step_fn`, the contract of `kvattn.decoding` (as for
`kvattn.generate`): `(params, caches, tokens [B, T], mask [B, T] | None) ->
(logits [B, T, V], caches)`, run here at batch BW, one row per beam. The
prompt is prefilled once, repeated BW times; then each step scores every
continuation of every live beam, beam score + log p(token), keeps the best,
gathers the caches' rows to follow each survivor's parent beam
(`kvattn.reorder`) and feeds the chosen tokens. Everything runs in one
compiled function (a `lax.fori_loop` over the steps), once per shape and
static setting (step_fn, BW, M); the length penalty, eos_id and pad_id are
traced. The reorder gathers whole cache rows, O(BW S) per layer and step, as
any beam search over an explicit cache does.

Scores and the length penalty follow the form of Hugging Face's `length_penalty`:
a hypothesis of n generated tokens (its EOS included; the prompt not counted)
with log-probabilities summing to s scores s / n ** length_penalty. 0 ranks by
the plain sum (favouring short hypotheses), 1 by the mean log-probability,
more than 1 favours long ones. Live beams are ranked by the plain sum while
they grow, as in Hugging Face; the penalty decides between finished ones.

With `eos_id`, each step considers the best BC = 2 BW continuations: one ending
in EOS is finished (as in Hugging Face, only when it ranks among the best BW),
and the best BW that do not end stay alive, so BW beams keep growing after some
finish. The BW best finished hypotheses are kept; after M steps the live beams
count as finished too, and the best BW of all are returned.

Shape legend:
  P: prompt length
  BW: beam width (the batch the model runs at)
  V: vocabulary size
  M: max_new_tokens
  BC: continuations considered per step, min(2 BW, BW V)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import cache_ops
from kvattn import decoding
from kvattn._cache_tree import check_caches, map_caches
from kvattn._checks import check_positive_ints, is_real
from kvattn.decoding import StepFn


class _Beams(NamedTuple):
  """The loop's carry.

  Fields:
    alive_tokens: int32 `[BW, M]` the live beams; `pad_id` past the current step.
    alive_scores: float32 `[BW]` their summed log-probabilities; -inf for none.
    done_tokens: int32 `[BW, M]` the best finished hypotheses; `pad_id` after EOS.
    done_scores: float32 `[BW]` their penalised scores, descending; -inf for none.
  """

  alive_tokens: jax.Array
  alive_scores: jax.Array
  done_tokens: jax.Array
  done_scores: jax.Array


def beam_search(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: Any, *, beam_width: int,
                max_new_tokens: int, length_penalty: float = 1.0,
                eos_id: int | Sequence[int] | None = None,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Returns the BW best continuations of one prompt and their scores.

  Args:
    step_fn: the model, `(params, caches, tokens [BW, T], mask [BW, T] | None) ->
      (logits [BW, T, V], caches)`. Static: pass the same object each call.
    params: the model's params (any pytree).
    caches: the model's caches for batch BW: a pytree of `KVCache`s (stacked
      ones too) with max_len >= P + M - 1.
    prompt_tokens: int `[P]` or `[1, P]`, one prompt, every token real.
    beam_width: BW >= 1. BW = 1 is greedy decoding (without EOS, or with
      length_penalty 0).
    max_new_tokens: M >= 1.
    length_penalty: the exponent of the length in the score (see the module
      docstring); 0 ranks finished hypotheses by their summed log-probability.
    eos_id: a hypothesis ends when it produces this token, or any of these
      tokens (a list of ints, as for `kvattn.generate`); None: never, every
      hypothesis has M tokens.
    pad_id: fills `tokens` after a hypothesis's EOS.

  Returns:
    `(tokens [BW, M] int32, scores [BW] float32)`, best first: score = summed
    log-probability / (generated tokens) ** length_penalty. Where fewer than BW
    hypotheses exist (BW > V at the first step), the rest score -inf.
  """
  decoding.check_step_fn(step_fn)
  prompt, mask = _check_prompt(prompt_tokens)
  check_positive_ints(beam_width=beam_width, max_new_tokens=max_new_tokens)
  if not is_real(length_penalty):
    raise ValueError(f"length_penalty should be a real number: but got {length_penalty!r}")
  decoding.check_eos(eos_id)
  decoding.check_pad(pad_id)
  p = prompt.shape[1]
  check_caches("caches", caches, beam_width, p + max_new_tokens - 1,
               f"P + M - 1 = {p} + {max_new_tokens} - 1")
  decoding.check_prompt_values(step_fn, caches, prompt, mask, max_new_tokens)
  eos = None if eos_id is None else decoding.eos_ids(eos_id)
  return _search(step_fn, params, caches, prompt, jnp.asarray(length_penalty, jnp.float32), eos,
                 jnp.asarray(pad_id, jnp.int32), beam_width=beam_width,
                 max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("step_fn", "beam_width", "max_new_tokens"))
def _search(step_fn, params, caches, prompt, length_penalty, eos_id, pad_id, *, beam_width,
            max_new_tokens):
  """The whole search, compiled: prefill, M selections, M - 1 decode steps."""
  w, m = beam_width, max_new_tokens
  tokens = jnp.broadcast_to(prompt.astype(jnp.int32), (w, prompt.shape[1]))
  logits, caches = step_fn(params, caches, tokens, None)
  none = jnp.full((w,), -jnp.inf, jnp.float32)
  empty = jnp.full((w, m), pad_id, jnp.int32)
  # Every row holds the same prompt: only beam 0 may start, or the BW beams
  # would be BW copies of the best one.
  beams = _Beams(alive_tokens=empty, alive_scores=none.at[0].set(0.0), done_tokens=empty,
                 done_scores=none)
  select = functools.partial(_select, length_penalty=length_penalty, eos_id=eos_id)
  beams, chosen, parents = select(beams, _log_probs(logits[:, -1]), 0)

  def step(i, carry):
    beams, chosen, parents, caches = carry
    # The caches follow the survivors here, just before they are fed: the last
    # step's parents are never needed.
    caches = map_caches(cache_ops.reorder, caches, parents)
    logits, caches = step_fn(params, caches, chosen[:, None], None)
    return (*select(beams, _log_probs(logits[:, 0]), i), caches)

  beams, _, _, _ = lax.fori_loop(1, m, step, (beams, chosen, parents, caches))
  # After M steps the live beams are finished hypotheses of M tokens.
  alive = beams.alive_scores / _length_factor(m, length_penalty)
  scores, best = lax.top_k(jnp.concatenate([beams.done_scores, alive]), w)
  return jnp.concatenate([beams.done_tokens, beams.alive_tokens])[best], scores


def _log_probs(logits):
  """float32 log-softmax of `[BW, V]` logits."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _length_factor(n, length_penalty):
  """n ** length_penalty for n generated tokens, float32."""
  return jnp.asarray(n, jnp.float32)**length_penalty


def _select(beams: _Beams, logp: jax.Array, i, *, length_penalty, eos_id):
  """Column i from the live beams' next-token log-probs `[BW, V]`.

  Returns (beams, chosen [BW], parents [BW]): the new beams, each survivor's
  token and the old beam it extends.
  """
  w, v = logp.shape
  c = min(2 * w, w * v)
  scores, flat = lax.top_k((beams.alive_scores[:, None] + logp).reshape(-1), c)  # [BC]
  parent, token = flat // v, flat % v
  seqs = lax.dynamic_update_index_in_dim(beams.alive_tokens[parent], token, i, axis=1)  # [BC, M]
  if eos_id is None:
    ended = jnp.zeros((c,), jnp.bool_)
  else:
    ended = decoding.is_eos(token, eos_id)
  # A continuation ending in EOS is finished if it ranks among the best BW (as in
  # Hugging Face); it then competes with the finished ones on its penalised score.
  finished = jnp.where(ended & (jnp.arange(c) < w), scores / _length_factor(i + 1, length_penalty),
                       -jnp.inf)
  done_scores, best = lax.top_k(jnp.concatenate([beams.done_scores, finished]), w)
  done_tokens = jnp.concatenate([beams.done_tokens, seqs])[best]
  alive_scores, keep = lax.top_k(jnp.where(ended, -jnp.inf, scores), w)
  beams = _Beams(alive_tokens=seqs[keep], alive_scores=alive_scores, done_tokens=done_tokens,
                 done_scores=done_scores)
  return beams, token[keep], parent[keep]


def _check_prompt(prompt_tokens) -> tuple[jax.Array, jax.Array]:
  """prompt_tokens `[P]` or `[1, P]`, integer, P >= 1 -> (tokens `[1, P]`, mask `[1, P]`).

  One prompt, every token real; past its shape, the prompt rules of every
  decoding loop (`kvattn.decoding.check_prompts`).
  """
  shape = getattr(prompt_tokens, "shape", None)
  if shape is None or not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)):
    raise ValueError(f"prompt_tokens shape should be (P,) or (1, P): but got {shape}")
  prompt = prompt_tokens.reshape(1, shape[-1])
  mask = jnp.ones(prompt.shape, jnp.bool_)
  decoding.check_prompts(prompt, mask)
  return jnp.asarray(prompt), mask
