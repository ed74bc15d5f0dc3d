"""A generation loop for any model whose attention keeps kvattn caches.

The model is a function `step_fn(params, caches, tokens [B, T], mask [B, T] or
None) -> (logits [B, T, V], caches)`: any pytree of caches, any number of
tokens per call. Generation is one prefill of a ragged batch of prompts, then
decode steps in a `lax.while_loop` that stops each row at `eos_id` and stops
altogether once every row is done. `generate_stream` runs the same steps from
Python and yields each token as it is produced.

Shape legend:
  B: batch size
  P: padded prompt length
  T: tokens per model call
  U: prefill chunk size (chunk_size)
  V: vocabulary size
  M: max_new_tokens
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvattn._checks import check_mask, check_positive_ints, check_shape
from kvattn.cache import KVCache

StepFn = Callable[[Any, Any, jax.Array, "jax.Array | None"], tuple[jax.Array, Any]]
Sampler = Callable[[jax.Array, jax.Array], jax.Array]

PREFILL_MODES = ("one_pass", "chunked", "forced")


class DecodeState(NamedTuple):
  """The loop's carry; every leaf is an array.

  Fields:
    tokens: int32 `[B, M]` generated tokens; `pad_id` after a row's EOS and in
      columns not generated yet.
    lengths: int32 `[B]` tokens generated per row, its EOS included.
    done: bool `[B]` True once a row produced EOS.
    step: int32 `[]` columns of `tokens` filled so far.
    caches: the model's caches, holding everything but the newest token.
    key: the PRNG key; column i is drawn with `fold_in(key, i)`, so a column's
      randomness does not depend on how the loop was run.
  """

  tokens: jax.Array
  lengths: jax.Array
  done: jax.Array
  step: jax.Array
  caches: Any
  key: jax.Array


class Generation(NamedTuple):
  """What `generate` returns.

  Fields:
    tokens: int32 `[B, M]`; `pad_id` after a row's EOS.
    lengths: int32 `[B]` tokens generated per row, its EOS included.
    caches: the caches after generation (check `kvattn.overflowed` on them).
  """

  tokens: jax.Array
  lengths: jax.Array
  caches: Any


# eos_id and pad_id are traced (see `generate`).
_STATIC = ("step_fn", "sampler", "max_new_tokens", "prefill_mode", "chunk_size")


@functools.partial(jax.jit, static_argnames=_STATIC)
def start(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
          prompt_mask: jax.Array, key: jax.Array, *, max_new_tokens: int, sampler: Sampler,
          eos_id: int | None = None, pad_id: int = 0, prefill_mode: str = "one_pass",
          chunk_size: int | None = None) -> DecodeState:
  """Runs the prompts through the model and draws the first new token of each row.

  The first stage of `generate`; the arguments are `generate`'s.

  Returns:
    A `DecodeState` with column 0 filled (step 1).
  """
  b, p = _check_args(caches, prompt_tokens, prompt_mask, max_new_tokens, prefill_mode, chunk_size)
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  # Each row's last real prompt token (not column P - 1 under right padding).
  last = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1).astype(jnp.int32)
  if prefill_mode == "one_pass":
    logits, caches = step_fn(params, caches, prompt_tokens, prompt_mask)
    last_logits = _take(logits, last)
  else:
    size = 1 if prefill_mode == "forced" else chunk_size
    last_logits, caches = _chunked_prefill(step_fn, params, caches, prompt_tokens, prompt_mask,
                                           last, min(size, p))
  state = DecodeState(
      tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      lengths=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), jnp.bool_),
      step=jnp.zeros((), jnp.int32),
      caches=caches,
      key=key,
  )
  return _record(state, last_logits, sampler, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("step_fn", "sampler"))
def advance(step_fn: StepFn, params: Any, state: DecodeState, *, sampler: Sampler,
            eos_id: int | None = None, pad_id: int = 0) -> DecodeState:
  """One decode step: feeds each row's newest token and draws the next column.

  Rows already done feed `pad_id` masked out, so their caches gain nothing
  real. Call only while `state.step < M`.
  """
  newest = lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [B, 1]
  logits, caches = step_fn(params, state.caches, newest, ~state.done[:, None])
  return _record(state._replace(caches=caches), logits[:, 0], sampler, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("step_fn", "sampler"))
def finish(step_fn: StepFn, params: Any, state: DecodeState, *, sampler: Sampler,
           eos_id: int | None = None, pad_id: int = 0) -> DecodeState:
  """Decode steps in a `lax.while_loop` until M columns or every row is done."""
  n = state.tokens.shape[1]

  def cond(s):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s):
    return advance(step_fn, params, s, sampler=sampler, eos_id=eos_id, pad_id=pad_id)

  return lax.while_loop(cond, body, state)


def generate(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
             prompt_mask: jax.Array, *, max_new_tokens: int, sampler: Sampler,
             key: jax.Array, eos_id: int | None = None, pad_id: int = 0,
             prefill_mode: str = "one_pass", chunk_size: int | None = None) -> Generation:
  """Generates up to M tokens per prompt: a prefill, then a compiled decode loop.

  The two stages, `start` and `finish`, are each compiled once per shape and
  static setting (step_fn, sampler, M, prefill_mode, chunk_size); eos_id and
  pad_id are traced, so every EOS id shares a compilation (None, "no EOS", is
  compiled apart). The caches must have room for P + M - 1 more tokens.

  Args:
    step_fn: the model, `(params, caches, tokens [B, T], mask [B, T] | None) ->
      (logits [B, T, V], caches)`. Static: pass the same object each call.
    params: the model's params (any pytree).
    caches: the model's caches (any pytree; its `KVCache`s are checked for room).
    prompt_tokens: int `[B, P]` prompts, padded on the left or the right.
    prompt_mask: bool `[B, P]`, True for real tokens; every row needs one.
    key: a PRNG key.
    max_new_tokens: M >= 1.
    sampler: `(key, logits [B, V]) -> int32 [B]`, e.g. `kvattn.sampling.Sampler`.
    eos_id: a row is done once it produces this token; None: never.
    pad_id: fills `tokens` after EOS; finished rows feed it, masked out.
    prefill_mode: "one_pass" (the whole prompt in one call), "chunked" (calls of
      `chunk_size` tokens, the last one shorter) or "forced" (one token per
      call, as a decode step would). Greedy tokens are the same for all three.
    chunk_size: U for "chunked".

  Returns:
    `Generation(tokens [B, M], lengths [B], caches)`.
  """
  state = start(step_fn, params, caches, prompt_tokens, prompt_mask, key,
                max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id,
                prefill_mode=prefill_mode, chunk_size=chunk_size)
  state = finish(step_fn, params, state, sampler=sampler, eos_id=eos_id, pad_id=pad_id)
  return Generation(state.tokens, state.lengths, state.caches)


def generate_stream(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
                    prompt_mask: jax.Array, *, max_new_tokens: int, sampler: Sampler,
                    key: jax.Array, eos_id: int | None = None, pad_id: int = 0,
                    prefill_mode: str = "one_pass",
                    chunk_size: int | None = None) -> Iterator[jax.Array]:
  """Like `generate`, but yields each column, int32 `[B]`, as soon as it is drawn.

  The steps are the compiled loop's own (`start`, then `advance` from Python),
  so the tokens are the same. Finished rows yield `pad_id`. Stops after M
  columns or once every row is done.
  """
  kw = dict(sampler=sampler, eos_id=eos_id, pad_id=pad_id)
  state = start(step_fn, params, caches, prompt_tokens, prompt_mask, key,
                max_new_tokens=max_new_tokens, prefill_mode=prefill_mode, chunk_size=chunk_size, **kw)
  yield state.tokens[:, 0]
  for i in range(1, max_new_tokens):
    if bool(jnp.all(state.done)):
      return
    state = advance(step_fn, params, state, **kw)
    yield state.tokens[:, i]


def _record(state: DecodeState, logits, sampler, eos_id, pad_id) -> DecodeState:
  """Draws column `state.step` from logits `[B, V]` for the rows not done."""
  token = sampler(jax.random.fold_in(state.key, state.step), logits).astype(jnp.int32)
  token = jnp.where(state.done, pad_id, token)
  tokens = lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1)
  lengths = jnp.where(state.done, state.lengths, state.step + 1)
  done = state.done if eos_id is None else state.done | (token == eos_id)
  return state._replace(tokens=tokens, lengths=lengths, done=done, step=state.step + 1)


def _take(logits, index):
  """logits `[B, T, V]` at each row's `index [B]` -> `[B, V]`."""
  return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def _chunked_prefill(step_fn, params, caches, tokens, mask, last, size):
  """Feeds the prompt U tokens at a time; keeps each row's logits at its last token.

  Full chunks run under `lax.scan` (the model is traced once for them), the
  shorter remainder in one more call.
  """
  b, p = tokens.shape
  num_full = p // size

  def run(carry, chunk):
    caches, last_logits = carry
    lo, tok, msk = chunk
    logits, caches = step_fn(params, caches, tok, msk)
    here = (last >= lo) & (last < lo + tok.shape[1])
    picked = _take(logits, jnp.clip(last - lo, 0, tok.shape[1] - 1))
    if last_logits is None:  # The first chunk fixes the logits' shape and dtype.
      last_logits = jnp.zeros_like(picked)
    return (caches, jnp.where(here[:, None], picked, last_logits)), None

  # The first chunk runs outside the scan so that the carry has a known shape.
  (caches, last_logits), _ = run((caches, None), (0, tokens[:, :size], mask[:, :size]))
  if num_full > 1:
    full = num_full * size

    def split(a):  # [B, full - U] -> [num_full - 1, B, U]
      return a[:, size:full].reshape(b, num_full - 1, size).swapaxes(0, 1)

    starts = jnp.arange(1, num_full, dtype=jnp.int32) * size
    (caches, last_logits), _ = lax.scan(run, (caches, last_logits),
                                        (starts, split(tokens), split(mask)))
  if p % size:
    lo = num_full * size
    (caches, last_logits), _ = run((caches, last_logits), (lo, tokens[:, lo:], mask[:, lo:]))
  return last_logits, caches


def _check_args(caches, tokens, mask, max_new_tokens, prefill_mode, chunk_size):
  """Static checks; returns (B, P)."""
  check_shape("prompt_tokens", tokens, "(B, P)", (None, None))
  b, p = tokens.shape
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens dtype should be an integer: but got {tokens.dtype}")
  if p < 1:
    raise ValueError(f"prompt_tokens shape should be (B, P) with P >= 1: but got {tokens.shape}")
  check_mask(mask, b, p)
  check_positive_ints(max_new_tokens=max_new_tokens)
  if prefill_mode not in PREFILL_MODES:
    raise ValueError(f"prefill_mode should be one of {PREFILL_MODES}: but got {prefill_mode!r}")
  if prefill_mode == "chunked" and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                    or chunk_size < 1):
    raise ValueError(f"chunk_size should be a positive int with prefill_mode='chunked': "
                     f"but got {chunk_size!r}")
  needed = p + max_new_tokens - 1
  for cache in jax.tree.leaves(caches, is_leaf=lambda x: isinstance(x, KVCache)):
    if isinstance(cache, KVCache):
      s = cache.k.shape[-3]  # k is [..., B, S, K, H] (stacked caches have leading axes).
      if s < needed:
        raise ValueError(
            f"caches have max_len S={s}, too small for P + max_new_tokens - 1 = "
            f"{p} + {max_new_tokens} - 1 = {needed} tokens")
  return b, p
