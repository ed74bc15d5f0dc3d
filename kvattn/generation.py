"""A generation loop for any model whose attention keeps kvattn caches.

The model is a function `step_fn(params, caches, tokens [B, T], mask [B, T] or
None) -> (logits [B, T, V], caches)`, the contract every decoding loop shares
(`kvattn.decoding`, whose `StepFn`, `Sampler`, `is_eos`, `check_eos`,
`check_pad` and `check_prompt_values` are importable from here too): any
pytree of caches, any number of tokens per call. A step_fn that also takes a
keyword `logits_at` (int32 `[B]`, one column per row) and then returns only
those columns' logits `[B, 1, V]` gets it in the one-pass prefill, which
needs only each row's last real token's logits (`kvattn.models.transformer.step`
does). A step_fn may also carry int attributes `vocab_size` (V) and
`max_positions` (the positions the model has, for learned position
embeddings; None for none); `generate` then refuses concrete prompts with ids
outside [0, V) and prompts that would run past the positions
(`transformer.step_fn` has both).
Generation is one prefill of a ragged batch of prompts, then decode steps in
a `lax.while_loop` that stops each row at `eos_id` and stops altogether once
every row is done. `generate_stream` runs the same steps from
Python and yields each token as it is produced. Both pad the prompts on the
right up to a bucket length (`prompt_buckets`), so that prompts of many
lengths share a few compilations.

Shape legend:
  B: batch size
  P: padded prompt length (before bucketing)
  T: tokens per model call
  U: prefill chunk size (chunk_size)
  V: vocabulary size
  M: max_new_tokens
  S: the caches' max_len
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import numbers
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn import decoding
from kvattn import sampling
from kvattn._cache_tree import caches_in
from kvattn._checks import check_positive_ints, check_shape, is_concrete, is_int
# The decoding contract, importable from here as before it moved to kvattn.decoding.
from kvattn.decoding import Sampler, StepFn, check_eos, check_pad, check_prompt_values, is_eos

PREFILL_MODES = ("one_pass", "chunked", "forced")

# Powers of two from 16 to 2**30, past any cache's max_len: the default bucket
# lengths of the prompts (see `bucket_length`).
DEFAULT_PROMPT_BUCKETS = tuple(2**i for i in range(4, 31))


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
      They hold the prompts and every generated token but each row's newest,
      `tokens[b, lengths[b] - 1]`: it was drawn, never fed to the model. To
      go on with a conversation, feed it first: `continue_from(out, tokens,
      mask)` builds that next prompt.
  """

  tokens: jax.Array
  lengths: jax.Array
  caches: Any


# eos_id and pad_id are traced (see `generate`).
# The sampler is traced too: a `Sampler`'s temperature and top-p are leaves;
# another callable travels as a leafless `jax.tree_util.Partial` (static).
_STATIC = ("step_fn", "max_new_tokens", "prefill_mode", "chunk_size")


def start(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
          prompt_mask: jax.Array, key: jax.Array, *, max_new_tokens: int, sampler: Sampler,
          eos_id: int | None = None, pad_id: int = 0, prefill_mode: str = "one_pass",
          chunk_size: int | None = None) -> DecodeState:
  """Runs the prompts through the model and draws the first new token of each row.

  The first stage of `generate`; the arguments are `generate`'s, with the
  prompts already padded to their bucket (`start` pads nothing: P here is the
  length compiled for). The sampler is traced: a `Sampler`, or any other
  callable wrapped in `jax.tree_util.Partial` (as `generate` does).
  `start_donating` is the same function with the caches donated.

  Returns:
    A `DecodeState` with column 0 filled (step 1).
  """
  b, p = _check_args(caches, prompt_tokens, prompt_mask, max_new_tokens, prefill_mode, chunk_size)
  check_eos(eos_id)
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  last = decoding.last_real(prompt_mask)  # Not column P - 1 under right padding.
  if prefill_mode == "one_pass":
    if decoding.takes_logits_at(step_fn):  # Only the last real token's logits are computed.
      logits, caches = step_fn(params, caches, prompt_tokens, prompt_mask, logits_at=last)
      last_logits = logits[:, 0]
    else:
      logits, caches = step_fn(params, caches, prompt_tokens, prompt_mask)
      last_logits = decoding.take_at(logits, last)
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


# Both compile as jit(start).
start_donating = jax.jit(start, static_argnames=_STATIC, donate_argnames="caches")
start = jax.jit(start, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames="step_fn", donate_argnames="state")
def advance(step_fn: StepFn, params: Any, state: DecodeState, *, sampler: Sampler,
            eos_id: int | None = None, pad_id: int = 0) -> DecodeState:
  """One decode step: feeds each row's newest token and draws the next column.

  Rows already done feed `pad_id` masked out, so their caches gain nothing
  real. Call only while `state.step < M`. The state is donated: its caches
  are updated in place.
  """
  newest = lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [B, 1]
  logits, caches = step_fn(params, state.caches, newest, ~state.done[:, None])
  return _record(state._replace(caches=caches), logits[:, 0], sampler, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames="step_fn", donate_argnames="state")
def finish(step_fn: StepFn, params: Any, state: DecodeState, *, sampler: Sampler,
           eos_id: int | None = None, pad_id: int = 0) -> DecodeState:
  """Decode steps in a `lax.while_loop` until M columns or every row is done.

  The state is donated, and the loop carries its caches: each step updates
  them in place, so the loop holds the caches once.
  """
  n = state.tokens.shape[1]

  def cond(s):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s):
    return advance(step_fn, params, s, sampler=sampler, eos_id=eos_id, pad_id=pad_id)

  return lax.while_loop(cond, body, state)


def generate(step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
             prompt_mask: jax.Array | None = None, *, max_new_tokens: int,
             sampler: Sampler = sampling.Sampler(), key: jax.Array | None = None,
             eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
             prefill_mode: str = "one_pass", chunk_size: int | None = None,
             prompt_buckets: Sequence[int] | None = DEFAULT_PROMPT_BUCKETS,
             donate_caches: bool = False) -> Generation:
  """Generates up to M tokens per prompt: a prefill, then a compiled decode loop.

  The two stages, `start` and `finish`, are each compiled once per shape and
  static setting (step_fn, M, prefill_mode, chunk_size, a `Sampler`'s top_k
  and whether its top_p is set, any other sampler's identity). Traced, so
  sharing one compilation: eos_id, pad_id, and a `Sampler`'s temperature and
  top_p values (eos_id None, "no EOS", is compiled apart). The decode loop
  updates the caches in place; with `donate_caches=True` the prefill writes
  into the caches given, too, so generation holds them once (the caches
  passed in are then invalid after the call). The prompts are first padded
  up to a bucket length (see `prompt_buckets`), so prompts of many lengths
  share a compilation of `start`. The caches must have room for P + M - 1
  more tokens.

  Args:
    step_fn: the model, `(params, caches, tokens [B, T], mask [B, T] | None) ->
      (logits [B, T, V], caches)`. Static: pass the same object each call.
    params: the model's params (any pytree).
    caches: the model's caches (any pytree; its `KVCache`s are checked for room).
    prompt_tokens: int `[B, P]` prompts, padded on the left or the right (an
      array, or nested lists of ints). Ids outside [0, V) are refused where
      the step_fn says its V (`vocab_size`) and the prompt is concrete.
    prompt_mask: bool `[B, P]`, True for real tokens; every row needs one
      (refused where the mask is concrete; under an outer jit a row without
      one generates from its padding, touching no other row). None: every
      token is real.
    key: a PRNG key; None only with a greedy sampler (nothing is drawn).
    max_new_tokens: M >= 1.
    sampler: `(key, logits [B, V]) -> int32 [B]`, e.g. `kvattn.sampling.Sampler`
      (default `Sampler()`: greedy); `kvattn.sampling.greedy` is taken too.
    eos_id: a row is done once it produces this token, or any of these
      tokens (a list of ints, as Llama 3's `eos_token_id`); None: never.
    pad_id: fills `tokens` after EOS; finished rows feed it, masked out; it
      also fills the prompts' bucket padding.
    prefill_mode: "one_pass" (the whole prompt in one call), "chunked" (calls of
      `chunk_size` tokens, the last one shorter) or "forced" (one token per
      call, as a decode step would). Greedy tokens are the same for all three.
    chunk_size: U for "chunked".
    donate_caches: donate `caches` to the prefill, which then writes into
      their buffers: peak memory the caches once (plus a step's working
      set) rather than twice. The arrays passed in may not be used again.
    prompt_buckets: ascending positive ints, the lengths prompts are padded to
      (default 16, 32, 64, ...: `DEFAULT_PROMPT_BUCKETS`); None: P as it is.
      The prompts get `bucket_length(P, prompt_buckets, free - M + 1)` columns,
      the smallest bucket >= P for which the linear caches have room
      (bucket + M - 1 of their free slots, max_len minus the slots already
      written; padding takes no slot of a ring cache); where no bucket fits,
      P is kept, so bucketing never fails where P would not. The extra columns are appended on the
      right: `pad_id` tokens, mask False. The tokens generated are the same
      as without bucketing (padding gets no position and is never attended);
      what changes is the caches' layout: the padding occupies bucket - P
      slots (marked not valid) before the new tokens, and the prefill runs
      over all bucket columns (in every prefill mode). The room is read off
      the `KVCache`s among `caches`; without any, or under an outer jit, P is
      kept.

  Returns:
    `Generation(tokens [B, M], lengths [B], caches)`.
  """
  prompt_tokens, prompt_mask, sampler, key = _prepare(step_fn, caches, prompt_tokens, prompt_mask,
                                                      sampler=sampler, key=key, eos_id=eos_id,
                                                      pad_id=pad_id, max_new_tokens=max_new_tokens,
                                                      prefill_mode=prefill_mode,
                                                      chunk_size=chunk_size)
  prompt_tokens, prompt_mask = _pad_to_bucket(caches, prompt_tokens, prompt_mask,
                                              max_new_tokens=max_new_tokens, pad_id=pad_id,
                                              prefill_mode=prefill_mode, chunk_size=chunk_size,
                                              prompt_buckets=prompt_buckets)
  begin = start_donating if donate_caches else start
  state = begin(step_fn, params, caches, prompt_tokens, prompt_mask, key,
                max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id,
                prefill_mode=prefill_mode, chunk_size=chunk_size)
  state = finish(step_fn, params, state, sampler=sampler, eos_id=eos_id, pad_id=pad_id)
  return Generation(state.tokens, state.lengths, state.caches)


def generate_stream(
    step_fn: StepFn, params: Any, caches: Any, prompt_tokens: jax.Array,
    prompt_mask: jax.Array | None = None, *, max_new_tokens: int,
    sampler: Sampler = sampling.Sampler(), key: jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None, pad_id: int = 0, prefill_mode: str = "one_pass",
    chunk_size: int | None = None,
    prompt_buckets: Sequence[int] | None = DEFAULT_PROMPT_BUCKETS) -> Iterator[jax.Array]:
  """Like `generate`, but yields each column, int32 `[B]`, as soon as it is drawn.

  The steps are the compiled loop's own (`start`, then `advance` from Python),
  and the prompts are padded to the same bucket, so the tokens are the same.
  Finished rows yield `pad_id`. Stops after M columns or once every row is
  done. The arguments are checked as `generate`'s, when it is called (not
  at the first `next`).
  """
  prompt_tokens, prompt_mask, sampler, key = _prepare(step_fn, caches, prompt_tokens, prompt_mask,
                                                      sampler=sampler, key=key, eos_id=eos_id,
                                                      pad_id=pad_id, max_new_tokens=max_new_tokens,
                                                      prefill_mode=prefill_mode,
                                                      chunk_size=chunk_size)
  prompt_tokens, prompt_mask = _pad_to_bucket(caches, prompt_tokens, prompt_mask,
                                              max_new_tokens=max_new_tokens, pad_id=pad_id,
                                              prefill_mode=prefill_mode, chunk_size=chunk_size,
                                              prompt_buckets=prompt_buckets)
  return _stream(step_fn, params, caches, prompt_tokens, prompt_mask, key,
                 max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id,
                 prefill_mode=prefill_mode, chunk_size=chunk_size)


def _stream(step_fn, params, caches, prompt_tokens, prompt_mask, key, *, max_new_tokens, sampler,
            eos_id, pad_id, prefill_mode, chunk_size) -> Iterator[jax.Array]:
  """generate_stream's generator, over checked and padded prompts."""
  kw = dict(sampler=sampler, eos_id=eos_id, pad_id=pad_id)
  state = start(step_fn, params, caches, prompt_tokens, prompt_mask, key,
                max_new_tokens=max_new_tokens, prefill_mode=prefill_mode, chunk_size=chunk_size,
                **kw)
  yield state.tokens[:, 0]
  for i in range(1, max_new_tokens):
    if bool(jnp.all(state.done)):
      return
    state = advance(step_fn, params, state, **kw)
    yield state.tokens[:, i]


def bucket_length(p: int, buckets: Sequence[int] | None, room: int | None = None) -> int:
  """The length a prompt of P columns is padded to.

  Args:
    p: P, the prompt's length.
    buckets: ascending positive ints (e.g. `DEFAULT_PROMPT_BUCKETS`); None: no
      bucketing.
    room: the longest prompt the caches have room for (S - M + 1); None: no
      limit.

  Returns:
    The smallest bucket >= P that is at most `room`; P itself where there is
    none (P beyond the last bucket, or the bucket too long for the room) or
    `buckets` is None. E.g. 16 for P = 5 with the default buckets, but 5 if
    room is 12.
  """
  _check_buckets(buckets)
  if buckets is None:
    return p
  # Ascending: if the first bucket >= P has no room, no later one has.
  bucket = next((b for b in buckets if b >= p), p)
  return bucket if room is None or bucket <= room else p


def _traceable(sampler):
  """The sampler as a jit argument: a `Sampler` (a pytree) as it is, else a leafless Partial.

  `sampling.greedy` (which takes logits alone) becomes `Sampler()`, the same
  choice; any other callable must take `(key, logits)`.
  """
  if sampler is sampling.greedy:
    return sampling.Sampler()
  if not callable(sampler):
    raise TypeError(f"sampler should be a callable (key, logits [B, V]) -> int32 [B], e.g. "
                    f"kvattn.sampling.Sampler(): but got {sampler!r}")
  if isinstance(sampler, (sampling.Sampler, jax.tree_util.Partial)):
    return sampler
  try:
    inspect.signature(sampler).bind(None, None)
  except TypeError as e:
    raise TypeError(f"sampler should take (key, logits [B, V]) and return int32 [B], e.g. "
                    f"kvattn.sampling.Sampler(top_p=0.9): but {sampler!r} cannot be called "
                    f"so ({e})") from None
  except ValueError:  # No signature to read: trust it.
    pass
  return jax.tree_util.Partial(sampler)


def _is_greedy(sampler) -> bool:
  """True when the sampler draws nothing at random: a `Sampler` with a concrete temperature 0."""
  return (isinstance(sampler, sampling.Sampler) and isinstance(sampler.temperature, numbers.Number)
          and sampler.temperature == 0)


def continue_from(out: Generation, tokens: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """The next prompt after `out`: each row's newest generated token, then `tokens`.

  `out.caches` hold everything but each row's newest token (drawn, never
  fed), so a conversation goes on with `generate(step_fn, params, out.caches,
  *continue_from(out, tokens, mask), ...)`: the new prompt starts with that
  token, and the result is the same as a fresh run over the whole history.

  Args:
    out: what `generate` returned.
    tokens: int `[B, T]` the next turn's tokens (T may be 0), padded anywhere.
    mask: bool `[B, T]`, True for real tokens; None: all real.

  Returns:
    `(tokens [B, 1 + T] int32, mask [B, 1 + T] bool)`, numpy.
  """
  generated = np.asarray(out.tokens)
  lengths = np.asarray(out.lengths)
  b = generated.shape[0]
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] != b or (tokens.size
                                                  and not np.issubdtype(tokens.dtype, np.integer)):
    raise ValueError(f"tokens should be int with shape (B, T)=({b}, None): but got "
                     f"{tokens.dtype} {tokens.shape}")
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask)
  if mask.shape != tokens.shape or mask.dtype != np.bool_:
    raise ValueError(f"mask should be bool with shape {tokens.shape}: but got {mask.dtype} "
                     f"{mask.shape}")
  if np.any(lengths < 1):
    raise ValueError(f"out.lengths should be >= 1 in every row: but got {lengths.tolist()}")
  newest = generated[np.arange(b), lengths - 1]
  return (np.concatenate([newest[:, None], tokens.astype(np.int32)], axis=1).astype(np.int32),
          np.concatenate([np.ones((b, 1), bool), mask], axis=1))


def _prepare(step_fn, caches, tokens, mask, *, sampler, key, eos_id, pad_id, max_new_tokens,
             prefill_mode, chunk_size):
  """The checks of generate's arguments, before anything is traced.

  Returns (tokens [B, P], mask [B, P], the traceable sampler, key): lists
  become arrays, a mask of None all True, a key of None (greedy) a fixed one.
  """
  decoding.check_step_fn(step_fn)
  tokens, mask = decoding.as_prompts(tokens, mask)
  check_shape("prompt_tokens", tokens, "(B, P)", (None, None))
  b = tokens.shape[0]
  found = caches_in(caches)
  for cache in found:
    if cache.batch_size != b:
      raise ValueError(f"caches batch size should be prompt_tokens' B={b}: but got "
                       f"{cache.batch_size} (k shape {cache.k.shape})")
  _check_args(caches, tokens, mask, max_new_tokens, prefill_mode, chunk_size)
  check_eos(eos_id)
  check_pad(pad_id)
  sampler = _traceable(sampler)
  if key is None:
    if not _is_greedy(sampler):
      raise ValueError(f"key should be a PRNG key (jax.random.key(seed)) for a sampler that "
                       f"draws at random: but got None with sampler={sampler!r}")
    key = jax.random.key(0)  # Never used: greedy draws nothing.
  if is_concrete(tokens) and is_concrete(mask):
    check_prompt_values(step_fn, caches, tokens, mask, max_new_tokens)
  return tokens, mask, sampler, key


def _record(state: DecodeState, logits, sampler, eos_id, pad_id) -> DecodeState:
  """Draws column `state.step` from logits `[B, V]` for the rows not done."""
  token = sampler(jax.random.fold_in(state.key, state.step), logits).astype(jnp.int32)
  token = jnp.where(state.done, pad_id, token)
  tokens = lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1)
  lengths = jnp.where(state.done, state.lengths, state.step + 1)
  done = state.done if eos_id is None else state.done | is_eos(token, eos_id)
  return state._replace(tokens=tokens, lengths=lengths, done=done, step=state.step + 1)


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
    picked = decoding.take_at(logits, jnp.clip(last - lo, 0, tok.shape[1] - 1))
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


def _pad_to_bucket(caches, tokens, mask, *, max_new_tokens, pad_id, prefill_mode, chunk_size,
                   prompt_buckets):
  """Checks generate's arguments, then pads the prompts on the right to their bucket.

  Plain Python on static shapes, before `start`: P and the buckets choose the
  shape compiled for. Returns (tokens [B, bucket], mask [B, bucket]).
  """
  _check_buckets(prompt_buckets)
  _, p = _check_args(caches, tokens, mask, max_new_tokens, prefill_mode, chunk_size)
  free, positions, _, known = decoding.capacity(caches)
  if not known:  # No KVCache, or a traced leaf: the room for padding is unknown.
    return tokens, mask
  needed = p + max_new_tokens - 1
  if free is not None and free < needed:
    raise ValueError(
        f"caches have {free} free slots (max_len minus the slots already written), too few "
        f"for P + max_new_tokens - 1 = {p} + {max_new_tokens} - 1 = {needed} tokens")
  real = (decoding.longest_prompt(mask) if is_concrete(mask) else p) + max_new_tokens - 1
  if positions is not None and positions < real:
    raise ValueError(
        f"ring caches have {positions} positions left (max_len minus the longest row), too "
        f"few for the longest prompt + max_new_tokens - 1 = {real} tokens")
  room = free if free is not None else needed + max(prompt_buckets or (0,))
  extra = bucket_length(p, prompt_buckets, room - max_new_tokens + 1) - p
  if not extra:
    return tokens, mask
  return _pad_right(tokens, extra, pad_id), _pad_right(mask, extra, False)


def _pad_right(x, extra, value):
  """x `[B, P]` -> `[B, P + extra]`, the new columns `value`; stays numpy if it was."""
  widths = ((0, 0), (0, extra))
  if isinstance(x, jax.Array) or isinstance(value, jax.Array):
    return jnp.pad(x, widths, constant_values=value)
  return np.pad(np.asarray(x), widths, constant_values=value)


def _check_buckets(buckets):
  """Raises ValueError unless buckets is None or ascending positive ints."""
  if buckets is None:
    return
  ok = (isinstance(buckets, collections.abc.Sequence) and not isinstance(buckets, str)
        and len(buckets) > 0 and all(is_int(b) and b >= 1 for b in buckets)
        and all(a < b for a, b in zip(buckets, buckets[1:])))
  if not ok:
    raise ValueError("prompt_buckets should be None or a non-empty sequence of ascending "
                     f"positive ints: but got {buckets!r}")


def _check_args(caches, tokens, mask, max_new_tokens, prefill_mode, chunk_size):
  """Static checks; returns (B, P)."""
  b, p = decoding.check_prompts(tokens, mask)
  check_positive_ints(max_new_tokens=max_new_tokens)
  if prefill_mode not in PREFILL_MODES:
    raise ValueError(f"prefill_mode should be one of {PREFILL_MODES}: but got {prefill_mode!r}")
  if prefill_mode == "chunked" and not (is_int(chunk_size) and chunk_size >= 1):
    raise ValueError(f"chunk_size should be a positive int with prefill_mode='chunked': "
                     f"but got {chunk_size!r}")
  needed = p + max_new_tokens - 1
  s = decoding.max_len(caches)
  if s is not None and s < needed:
    raise ValueError(f"caches have max_len S={s}, too small for P + max_new_tokens - 1 = "
                     f"{p} + {max_new_tokens} - 1 = {needed} tokens")
  return b, p
