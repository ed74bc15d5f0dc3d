"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of logits and an explicit PRNG key; nothing is stateful, so
the same key gives the same tokens. `Sampler` bundles the settings into a
callable pytree, the `sampler` argument of `kvattn.generate`.

Shape legend:
  B: batch size
  V: vocabulary size
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvattn._checks import check_shape, is_int


def greedy(logits: jax.Array) -> jax.Array:
  """Returns int32 `[B]`: the most likely token of each row (the first, on ties).

  logits may have more axes, `[B, ..., V]` -> `[B, ...]` (the greedy choice
  after every token of a call, as speculative decoding verifies drafts).
  """
  if getattr(logits, "ndim", 0) < 2:
    raise ValueError(f"logits shape should be (B, V) or (B, ..., V): but got "
                     f"{getattr(logits, 'shape', None)}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits dtype should be floating: but got {logits.dtype}")
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_logits(logits: jax.Array, k: int) -> jax.Array:
  """Returns float32 `[B, V]`: logits outside each row's k largest set to -inf.

  Tokens tied with the k-th largest logit are all kept. `k` is static; k >= V
  keeps every token.
  """
  _check_logits(logits)
  v = logits.shape[-1]
  if not is_int(k) or k < 1:
    raise ValueError(f"k should be a positive int: but got {k!r}")
  logits = logits.astype(jnp.float32)
  if k >= v:
    return logits
  kth = lax.top_k(logits, k)[0][:, k - 1:]  # [B, 1]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_logits(logits: jax.Array, p: float | jax.Array) -> jax.Array:
  """Returns float32 `[B, V]`: logits outside each row's nucleus set to -inf.

  The nucleus is the smallest set of most likely tokens whose probability
  reaches `p` (the most likely token is always in it; tokens tied with the
  least likely member are kept too). `p` in (0, 1] may be traced; p = 1
  keeps every token, however the float32 sums round.
  """
  _check_logits(logits)
  if isinstance(p, (int, float)) and not 0.0 < p <= 1.0:
    raise ValueError(f"p should be in (0, 1]: but got {p!r}")
  logits = logits.astype(jnp.float32)
  sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V] descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  total = jnp.cumsum(probs, axis=-1)
  # The probability of the tokens ranked above each one: an exclusive running
  # sum (total - probs would be one rounding away from it, and keep a token
  # whose mass above is exactly p).
  before = jnp.pad(total[:, :-1], ((0, 0), (1, 0)))
  # Against the sum as computed (not 1.0): over a large vocabulary the float32
  # running sum passes 1 before its last terms, which would cut them at p = 1.
  # A token whose mass above reaches p within float32 rounding (a few ulps of
  # the sum) is cut: the boundary case "mass above exactly p".
  p = jnp.asarray(p, jnp.float32)
  limit = p * total[:, -1:] * (1 - 4 * jnp.finfo(jnp.float32).eps)
  in_nucleus = (before < limit) | (p >= 1.0)
  # The smallest logit in the nucleus; everything below it is cut.
  threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(key: jax.Array, logits: jax.Array, *, temperature: float | jax.Array = 1.0,
           top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
  """Returns int32 `[B]`: one token per row drawn from the filtered softmax.

  Logits are divided by `temperature`, then cut to the `top_k` largest, then
  to the top-`top_p` nucleus (the order of Hugging Face's samplers). A
  temperature of 0 means greedy, whatever top_k and top_p say.

  Args:
    key: a PRNG key; one key draws the whole batch.
    logits: `[B, V]`.
    temperature: >= 0; a Python float or a traced scalar.
    top_k: None, or a static int in [1, V].
    top_p: None, or a probability in (0, 1].
  """
  _check_logits(logits)
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature should be >= 0: but got {temperature!r}")
  logits = logits.astype(jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  scaled = logits / jnp.where(t > 0, t, 1.0)
  if top_k is not None:
    scaled = top_k_logits(scaled, top_k)
  if top_p is not None:
    scaled = top_p_logits(scaled, top_p)
  drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(t > 0, drawn, greedy(logits))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Sampling settings as a callable `(key, logits [B, V]) -> int32 [B]`, and a pytree.

  temperature and top_p are the pytree's leaves, so `kvattn.generate` traces
  them: a new temperature or top-p value runs the program already compiled.
  top_k (a shape in `lax.top_k`) and whether top_p is set are static: each
  top_k value, and top_p None vs a value, compiles once. Equal concrete
  settings compare and hash equal.

  temperature defaults to 0 (greedy) when neither top_k nor top_p is given,
  and to 1 when either is: `Sampler(top_p=0.9)` samples from the nucleus.
  An explicit temperature of 0 is greedy whatever top_k and top_p say.
  """

  temperature: float | jax.Array | None = None
  top_k: int | None = None
  top_p: float | jax.Array | None = None

  def __post_init__(self):
    if self.temperature is None:
      filtered = self.top_k is not None or self.top_p is not None
      object.__setattr__(self, "temperature", 1.0 if filtered else 0.0)
    t, p, k = self.temperature, self.top_p, self.top_k
    if not _is_number(t) or (isinstance(t, numbers.Number) and not t >= 0):
      raise ValueError(f"temperature should be a number >= 0: but got {t!r}")
    if k is not None and not (is_int(k) and k >= 1):
      raise ValueError(f"top_k should be a positive int or None: but got {k!r}")
    if p is not None and (not _is_number(p) or
                          (isinstance(p, numbers.Number) and not 0.0 < p <= 1.0)):
      raise ValueError(f"top_p should be in (0, 1] or None: but got {p!r}")

  def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
    if isinstance(self.temperature, numbers.Number) and self.temperature == 0:
      return greedy(logits)  # Known greedy: no draw at all.
    return sample(key, logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def _is_number(x) -> bool:
  """A real Python number (not bool) or a scalar float array, traced or not."""
  if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
    return True
  return getattr(x, "shape", None) == () and jnp.issubdtype(getattr(x, "dtype", None), jnp.floating)


def _unflatten_sampler(top_k, leaves):
  sampler = object.__new__(Sampler)  # No checks: leaves may be tracers or placeholders.
  temperature, top_p = leaves
  for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
    object.__setattr__(sampler, name, value)
  return sampler


jax.tree_util.register_pytree_node(Sampler, lambda s: ((s.temperature, s.top_p), s.top_k),
                                   _unflatten_sampler)


def _check_logits(logits) -> None:
  check_shape("logits", logits, "(B, V)", (None, None))
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits dtype should be floating: but got {logits.dtype}")
