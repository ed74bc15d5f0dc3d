"""The contract every decoding loop shares: the model, the prompts, EOS, the caches' room.

`kvattn.generate` (and `generate_stream`), `kvattn.speculative` and
`kvattn.beam_search` drive a model they know only as a `StepFn`:

    step_fn(params, caches, tokens [B, T], mask [B, T] | None) -> (logits [B, T, V], caches)

`params` and `caches` are any pytrees; `tokens` are int32 ids, `mask` is bool,
True for real tokens (None: all real), and T is any length, the whole prompt
in a prefill or one token in a decode step. A row whose mask is False adds
no real token to the caches (a finished row feeds padding so). A step_fn is a
static argument of the compiled loops: pass the same object each call.
Optionally, a step_fn

  - takes a keyword `logits_at`, int32 `[B]` (one column per row), and then
    returns only those columns' logits, `[B, 1, V]`: generate's one-pass
    prefill passes each row's last real token (`takes_logits_at`);
  - carries int attributes `vocab_size` (V) and `max_positions` (the
    positions a model with learned position embeddings has; None for none):
    concrete prompts with ids outside [0, V), or that would run past the
    positions, are then refused (`check_prompt_values`).

The prompts are int `[B, P]` with a bool mask `[B, P]`, padded on the left or
the right (`as_prompts`, `check_prompts`), and every row needs a real token;
the logits a loop starts from are those of each row's last real token
(`last_real`, `take_at`). `eos_id` is None, an int or a list of ints
(`check_eos`, `is_eos`) and `pad_id` an int (`check_pad`). The room of the
caches is read off their `KVCache`s by one walk (`kvattn._cache_tree.rooms`):
`max_len` and `capacity` for generate, `check_caches` for the loops that
rewind or reorder the caches.

Shape legend:
  B: batch size
  P: prompt length (padded)
  T: tokens per model call
  V: vocabulary size
  E: number of EOS ids
  S: a cache's max_len (slots per row)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvattn._cache_tree import rooms
from kvattn._checks import check_mask, check_shape, is_concrete, is_int
from kvattn.masks import last_real

__all__ = [
    "Capacity",
    "Sampler",
    "StepFn",
    "as_prompts",
    "capacity",
    "check_eos",
    "check_pad",
    "check_prompt_values",
    "check_prompts",
    "check_step_fn",
    "eos_ids",
    "is_eos",
    "last_real",
    "longest_prompt",
    "max_len",
    "take_at",
    "takes_logits_at",
]

StepFn = Callable[[Any, Any, jax.Array, "jax.Array | None"], tuple[jax.Array, Any]]
Sampler = Callable[[jax.Array, jax.Array], jax.Array]


def check_step_fn(step_fn: Any, name: str = "step_fn") -> None:
  """Raises TypeError unless step_fn (called `name` in the message) is callable."""
  if not callable(step_fn):
    raise TypeError(f"{name} should be callable: but got {type(step_fn).__name__}")


def takes_logits_at(step_fn: StepFn) -> bool:
  """Whether step_fn takes `logits_at` (as transformers' generate checks for logits_to_keep)."""
  try:
    return "logits_at" in inspect.signature(step_fn).parameters
  except (TypeError, ValueError):  # No signature to read (some builtins): assume not.
    return False


def as_prompts(tokens: Any, mask: Any = None) -> tuple[Any, Any]:
  """The prompt arguments as arrays: nested lists as numpy, a mask of None as all True.

  Arrays pass as they are (jax arrays stay on their devices); nothing else is
  checked here (see `check_prompts`), but ragged lists are refused.

  Returns:
    `(tokens [B, P], mask [B, P])`.
  """
  tokens = _as_array("prompt_tokens", tokens)
  if mask is None and getattr(tokens, "ndim", None) == 2:
    mask = np.ones(tokens.shape, bool)
  return tokens, _as_array("prompt_mask", mask)


def _as_array(name, x):
  """Nested lists as a numpy array (so that the shape checks see a shape); arrays as they are."""
  if isinstance(x, (list, tuple)):
    try:
      return np.asarray(x)
    except ValueError as e:  # Ragged lists.
      raise ValueError(f"{name} should be a rectangular array (pad rows to one length and "
                       f"mark real tokens in prompt_mask): but got lists of different "
                       f"lengths ({e})") from None
  return x


def check_prompts(tokens: Any, mask: Any) -> tuple[int, int]:
  """Raises ValueError unless tokens are int `[B, P]`, B, P >= 1, and mask is bool `[B, P]`.

  Static checks (shapes and dtypes), so they hold under jit too; the values
  are `check_prompt_values`'.

  Returns:
    `(B, P)`.
  """
  check_shape("prompt_tokens", tokens, "(B, P)", (None, None))
  b, p = tokens.shape
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens dtype should be an integer: but got {tokens.dtype}")
  if b < 1 or p < 1:
    raise ValueError(f"prompt_tokens should hold at least one token (shape (B, P) with "
                     f"B, P >= 1): but got shape {tokens.shape}")
  check_mask(mask, b, p, name="prompt_mask")
  return b, p


def check_prompt_values(step_fn: StepFn, caches: Any, tokens: Any, mask: Any,
                        max_new_tokens: int) -> None:
  """Refuses concrete prompts the model cannot run: empty rows, ids past V, too many positions.

  The rule of every decoding loop: ids are checked against the step_fn's
  `vocab_size` and the positions against its `max_positions`, where it has
  them. Traced prompts are not checked (nothing can raise under jit).
  """
  if not (is_concrete(tokens) and is_concrete(mask)):
    return
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"prompt_mask should mark at least one real token in every row: but "
                     f"rows {empty.tolist()} have none")
  vocab_size = getattr(step_fn, "vocab_size", None)
  if vocab_size is not None:
    bad = mask & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
      row, col = (int(i[0]) for i in np.nonzero(bad))
      raise ValueError(f"prompt_tokens should be ids in [0, V)=[0, {vocab_size}): but got "
                       f"{int(tokens[row, col])} at row {row}, column {col}")
  max_positions = getattr(step_fn, "max_positions", None)
  if max_positions:
    held = capacity(caches).held
    longest = longest_prompt(mask)
    needed = held + longest + max_new_tokens - 1
    if needed > max_positions:
      raise ValueError(
          f"the model has {max_positions} positions (learned position embeddings): too few "
          f"for the tokens cached + the longest prompt + max_new_tokens - 1 = {held} + "
          f"{longest} + {max_new_tokens} - 1 = {needed}")


def longest_prompt(mask: Any) -> int:
  """The most real tokens of any row of a concrete mask bool `[B, P]`."""
  return int(np.max(np.sum(np.asarray(mask), axis=1)))


def take_at(x: jax.Array, index: jax.Array) -> jax.Array:
  """x `[B, T, ...]` at column `index[b]` of each row b (index int `[B]`) -> `[B, ...]`.

  E.g. the logits `[B, T, V]` of each row's last real token,
  `take_at(logits, last_real(mask))` -> `[B, V]`.
  """
  index = jnp.reshape(index, index.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


def eos_ids(eos_id: Any) -> jax.Array:
  """int32 `[E]`: the EOS ids of `eos_id`, an int, a list of ints or an array (not None)."""
  return jnp.concatenate([jnp.asarray(i, jnp.int32).reshape(-1) for i in jax.tree.leaves(eos_id)])


def is_eos(tokens: jax.Array, eos_id: Any) -> jax.Array:
  """bool, tokens' shape: True where a token is `eos_id`, or one of them (a list or an array)."""
  eos = eos_ids(eos_id)  # [E]
  return jnp.any(tokens[..., None] == eos.reshape((1,) * tokens.ndim + eos.shape), axis=-1)


def check_pad(pad_id: Any) -> None:
  """pad_id: an int, or an integer scalar array (traced or not)."""
  if not (is_int(pad_id) or
          (getattr(pad_id, "shape", None) == () and jnp.issubdtype(pad_id.dtype, jnp.integer))):
    raise ValueError(f"pad_id should be an int: but got {pad_id!r}")


def check_eos(eos_id: Any) -> None:
  """eos_id: None, an int, or a non-empty list or 1-D array of ints (traced or not).

  The rule of every decoding loop (`generate`, `generate_stream`,
  `speculative_generate`, `beam_search`).
  """
  if eos_id is None:
    return
  if isinstance(eos_id, str) or any(isinstance(i, str) for i in jax.tree.leaves(eos_id)):
    raise ValueError(f"eos_id should be None, an int or a non-empty list of ints: but got "
                     f"{eos_id!r}")
  leaves = jax.tree.leaves(eos_id)
  ok = bool(leaves) and all(
      is_int(i) or (len(getattr(i, "shape", (0, 0))) <= 1 and jnp.issubdtype(i.dtype, jnp.integer)
                    and np.prod(i.shape) > 0) for i in leaves)
  if not ok:
    raise ValueError(f"eos_id should be None, an int or a non-empty list of ints: but got "
                     f"{eos_id!r}")


class Capacity(NamedTuple):
  """What the `KVCache`s of a pytree have room for, read by `capacity`.

  Fields:
    free: the fewest slots not yet written among the linear caches (S minus
      their index); None without any.
    positions: the fewest positions left before a ring cache's
      `max_positions` (minus its longest row); None without rings.
    held: the most real tokens a row of any cache holds (caches with traced
      lengths left out); 0 without any.
    known: False when there is no KVCache at all, or when a counter that
      `free` or `positions` needs is traced (under an outer jit); `free` and
      `positions` are then None.
  """

  free: int | None
  positions: int | None
  held: int
  known: bool


def capacity(caches: Any) -> Capacity:
  """The room of the `KVCache`s among caches (any pytree), from their concrete counters."""
  found = rooms(caches)
  left = [
      None if not is_concrete(r.used) else r.capacity - int(np.max(np.asarray(r.used)))
      for r in found
  ]
  held = max((int(np.max(np.asarray(r.lengths))) for r in found if is_concrete(r.lengths)),
             default=0)
  if not found or any(n is None for n in left):
    return Capacity(free=None, positions=None, held=held, known=False)
  return Capacity(free=min((n for r, n in zip(found, left) if not r.ring), default=None),
                  positions=min((n for r, n in zip(found, left) if r.ring),
                                default=None), held=held, known=True)


def max_len(caches: Any) -> int | None:
  """The smallest max_len S of the linear `KVCache`s among caches; None if there are none.

  Read off static shapes only, so it holds under jit too.
  """
  return min((r.capacity for r in rooms(caches) if not r.ring), default=None)
