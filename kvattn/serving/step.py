"""The engine's one device function: a ragged model step, the forks' page copies, the draws.

The host (`kvattn.serving.engine`) owns the page tables, lengths and
reference counts and hands them in with every step; the function runs the
flat batch of new tokens through `transformer.paged_step`, copies the
forks' partial pages, and draws one token per sampled row. Its shapes are
the engine's buckets: TT tokens (one of a few sizes), SQ sequences, SR = SQ
rows drawn; everything else is data, so a step compiles once per token
bucket.

Shape legend:
  TT: tokens of the flat batch (a bucket)
  SQ: sequence slots
  SR: rows drawn per step (SQ)
  PPS: pages per slot
  NP: pages in the pool
  TL: alternatives reported per drawn token (the engine's max_logprobs)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvattn import paged
from kvattn.models import transformer
from kvattn.serving import sampler


class StepInputs(NamedTuple):
  """One step's batch, as arrays (numpy on the host, device arrays inside).

  Fields:
    tokens: int32 `[TT]` the new tokens, sequence after sequence, padding
      after `cu_q_lens[num_seqs]`.
    seq_slots: int32 `[SQ]`; cu_q_lens: int32 `[SQ + 1]`; num_seqs: int32
      scalar: the ragged batch (`kvattn.paged.paged_attention`).
    page_table: int32 `[SQ, PPS]`; lengths: int32 `[SQ]`; refs: int32
      `[NP]`: the pool's state before the step, as the host keeps it.
    copy_src, copy_dst: int32 `[SQ]` pages copied after the model runs
      (a fork's partial page); destination NP: no copy.
    sample_at: int32 `[SR]` the flat row each drawn row reads its logits at.
    seeds: uint32 `[SR]`; counts: int32 `[SR]`; temperature, top_p, min_p:
      float32 `[SR]`; top_k: int32 `[SR]`: each row's draw (`sampler.draw`).
  """

  tokens: jax.Array
  seq_slots: jax.Array
  cu_q_lens: jax.Array
  num_seqs: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  refs: jax.Array
  copy_src: jax.Array
  copy_dst: jax.Array
  sample_at: jax.Array
  seeds: jax.Array
  counts: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array


def copy_pages(caches: paged.PagedCache, src: jax.Array, dst: jax.Array) -> paged.PagedCache:
  """Copies page src[i] to dst[i] in every layer (dst >= NP: skipped). In place when donated."""
  num_pages = caches.num_pages
  src = jnp.clip(src, 0, num_pages - 1)
  dst = jnp.where((dst >= 0) & (dst < num_pages), dst, num_pages)
  out = {}
  for name in paged.cache.PAGE_LEAVES:
    pages = getattr(caches, name)
    if pages is not None:
      out[name] = pages.at[:, dst].set(pages[:, src], mode="drop")
  return caches._replace(**out)


def serve_step(params, caches: paged.PagedCache, batch: StepInputs, *, config: transformer.Config,
               num_top: int) -> tuple[sampler.Draw, jax.Array, paged.PagedCache]:
  """Runs one step: returns `(draw, exhausted [SQ] bool, caches)`.

  `exhausted` flags a slot whose write found no page (the host reserved too
  few: a bug the engine raises on; nothing of that slot was written).
  """
  caches = caches._replace(page_table=batch.page_table, lengths=batch.lengths, refs=batch.refs,
                           exhausted=jnp.zeros_like(caches.exhausted))
  logits, caches = transformer.paged_step(params, caches, batch.tokens, batch.seq_slots,
                                          batch.cu_q_lens, batch.num_seqs, config=config,
                                          logits_at=batch.sample_at)
  caches = copy_pages(caches, batch.copy_src, batch.copy_dst)
  draw = sampler.draw(logits, batch.seeds, batch.counts, batch.temperature, batch.top_k,
                      batch.top_p, batch.min_p, num_top)
  return draw, caches.exhausted, caches


def serve_decode_steps(params, caches: paged.PagedCache, batch: StepInputs, steps: jax.Array, *,
                       config: transformer.Config, num_top: int,
                       max_steps: int) -> tuple[sampler.Draw, jax.Array, paged.PagedCache]:
  """Runs `steps` (<= max_steps, traced) decode steps in one call, each feeding the next.

  `batch` is a decode step: sequence i's one token is row i (`cu_q_lens`
  0, 1, ..., num_seqs), drawn row i reads it (`sample_at` i), and no page
  is copied. Step j draws with `counts + j`. The host reserves the pages of
  all the steps first. Rows of a sequence that draws a stop token early go
  on (the host drops what follows); no other sequence sees them.

  Returns `(draws, exhausted, caches)`: every leaf of draws has a leading
  `[max_steps]` axis; entries past `steps` are zeros.
  """
  caches = caches._replace(page_table=batch.page_table, lengths=batch.lengths, refs=batch.refs,
                           exhausted=jnp.zeros_like(caches.exhausted))
  rows = batch.seeds.shape[0]
  out = sampler.Draw(jnp.zeros((max_steps, rows), jnp.int32),
                     jnp.zeros((max_steps, rows), jnp.float32),
                     jnp.zeros((max_steps, rows, num_top), jnp.int32),
                     jnp.zeros((max_steps, rows, num_top), jnp.float32))

  def body(j, carry):
    caches, tokens, out = carry
    logits, caches = transformer.paged_step(params, caches, tokens, batch.seq_slots,
                                            batch.cu_q_lens, batch.num_seqs, config=config,
                                            logits_at=batch.sample_at)
    draw = sampler.draw(logits, batch.seeds, batch.counts + j, batch.temperature, batch.top_k,
                        batch.top_p, batch.min_p, num_top)
    out = jax.tree.map(lambda o, d: o.at[j].set(d), out, draw)
    return caches, draw.tokens, out

  caches, _, out = lax.fori_loop(0, jnp.minimum(steps, max_steps), body,
                                 (caches, batch.tokens, out))
  return out, caches.exhausted, caches


@functools.lru_cache(maxsize=None)
def jitted_decode_steps(config: transformer.Config, num_top: int, max_steps: int,
                        cache_shardings=None, replicated=None):
  """The jitted `serve_decode_steps`, the caches donated (shardings as in `jitted`)."""
  fn = functools.partial(serve_decode_steps, config=config, num_top=num_top, max_steps=max_steps)
  if cache_shardings is None:
    return jax.jit(fn, donate_argnums=1)
  return jax.jit(fn, donate_argnums=1, out_shardings=(replicated, replicated, cache_shardings))


@functools.lru_cache(maxsize=None)
def jitted(config: transformer.Config, num_top: int, cache_shardings=None, replicated=None):
  """The jitted `serve_step` for a config, the caches donated.

  On a mesh: the caches keep `cache_shardings`, and the draws are
  `replicated` (every process reads them whole).
  """
  fn = functools.partial(serve_step, config=config, num_top=num_top)
  if cache_shardings is None:
    return jax.jit(fn, donate_argnums=1)
  return jax.jit(fn, donate_argnums=1, out_shardings=(replicated, replicated, cache_shardings))
