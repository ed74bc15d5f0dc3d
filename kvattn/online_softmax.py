"""Partial softmaxes and how they combine: the pieces every kernel shares.

Attention over keys split into blocks is computed one block at a time with an
online (log-sum-exp) softmax. A partial softmax of some query rows over some
keys is a triple `Partial(o, m, l)`:

  o: `[..., H]` sum over those keys of `exp(logit - m) * value`;
  m: `[...]` the largest logit of the row (`MASKED` while the row has seen
     no key);
  l: `[...]` sum over those keys of `exp(logit - m)`.

Two partials over disjoint keys combine exactly (`accumulate`), in any order;
`normalize` turns the last one into the attention output. A row that saw no
key at all has `l == 0` and `o == 0`, and normalises to zeros, never NaN.

Everything here is float32 and plain `jax.numpy`, so the XLA kernel and the
bodies of Pallas kernels use the same functions.

Shape legend:
  H: head dimension
  C: keys in one block
  "...": any leading axes (the query rows)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Masked logits get a large finite negative (not -inf), so exp() of a fully
# masked row is 0 rather than NaN, and max() of it is this finite value.
MASKED = -0.7 * float(np.finfo(np.float32).max)


class Partial(NamedTuple):
  """Unnormalised attention of some query rows over some keys (see the module doc)."""

  o: jax.Array
  m: jax.Array
  l: jax.Array


def empty(rows: tuple[int, ...], head_dim: int) -> Partial:
  """The partial of rows that have seen no key yet: the identity of `accumulate`."""
  return Partial(jnp.zeros((*rows, head_dim), jnp.float32), jnp.full(rows, MASKED, jnp.float32),
                 jnp.zeros(rows, jnp.float32))


def probabilities(logits: jax.Array, mask: jax.Array, axis: int,
                  softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Unnormalised probabilities of one block, and the block's row max.

  Args:
    logits: float32 logits (already scaled), keys along `axis`.
    mask: bool, broadcastable to `logits`; True where the query may attend.
    axis: the keys' axis.
    softcap: None, or c: the logits become `c * tanh(logits / c)` first
      (Gemma 2's attention logit soft-capping), before the mask.

  Returns:
    `(p, m)`: p like `logits`, `exp(logit - m)` where allowed and exactly 0
    elsewhere; m the row max over allowed keys (`MASKED` where none is), with
    `axis` removed.
  """
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask, logits, MASKED)
  m = jnp.max(logits, axis=axis)
  p = jnp.where(mask, jnp.exp(logits - jnp.expand_dims(m, axis)), 0.0)
  return p, m


def accumulate(a: Partial, b: Partial) -> Partial:
  """Combines two partials over disjoint keys into one, still unnormalised."""
  m = jnp.maximum(a.m, b.m)
  sa, sb = jnp.exp(a.m - m), jnp.exp(b.m - m)
  return Partial(a.o * sa[..., None] + b.o * sb[..., None], m, a.l * sa + b.l * sb)


def accumulate_axis(p: Partial, axis: int) -> Partial:
  """Combines the partials stacked along `axis` of m and l (o has H after it) into one."""
  m = jnp.max(p.m, axis=axis)
  scale = jnp.exp(p.m - jnp.expand_dims(m, axis))
  return Partial(jnp.sum(p.o * scale[..., None], axis=axis), m, jnp.sum(p.l * scale, axis=axis))


def normalize(p: Partial) -> jax.Array:
  """The attention output `o / l`; rows that saw nothing (l == 0) give zeros."""
  return p.o / jnp.where(p.l == 0.0, 1.0, p.l)[..., None]
