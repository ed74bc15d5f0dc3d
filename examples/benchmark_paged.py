"""Benchmarks the paged cache (kvattn.paged) against the dense cache and prints its tables.

Everything is timed side by side in one process (examples/timing.py): the
cases of a table run interleaved, round after round; each cell is the median
over rounds, with the minimum beside it. Caches are donated, as in real use.

  1. Decode step at several fills: `paged_attention` with one token per
     sequence against `cached_attention` with T=1 on a dense cache at the
     same fill, same B, heads and storage; the goal is within 1.2x.
  2. A mixed step: one long sequence's prefill chunk beside the decode
     tokens of many short sequences, in one call of one compiled step (its
     TT fits the largest chunk), against the chunk alone and the decode
     tokens alone: the cost follows the step's own tokens.
  3. Memory: the bytes a batch of uneven sequences holds in pages (pages in
     use) against a dense cache that gives every sequence max_len slots; and
     the compiled step's temporary memory for two pool sizes.

Usage:
  python examples/benchmark_paged.py           # B=4, N=K=8, H=64, max_len 2048, pages of 16
  python examples/benchmark_paged.py --quick   # small sizes, a few seconds (the smoke test)
"""

from __future__ import annotations

import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from examples import timing
import kvattn
from kvattn import paged

logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes and few rounds, for the smoke test.")
_BATCH = flags.DEFINE_integer("batch", 4, "B, sequences of the decode table.")
_HEADS = flags.DEFINE_integer("heads", 8, "N, query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "K, key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "H.")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "Tokens a sequence may hold (dense S).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "PS, tokens per page.")
_FILLS = flags.DEFINE_list("fills", ["64", "256", "1024", "1984"],
                           "Cached tokens per sequence at which a decode step is timed.")
_SHORT = flags.DEFINE_integer("short", 31, "Short sequences decoding beside the long one.")
_SHORT_FILL = flags.DEFINE_integer("short_fill", 128, "Cached tokens of each short sequence.")
_LONG_FILL = flags.DEFINE_integer("long_fill", 1024, "Cached tokens of the long sequence.")
_CHUNKS = flags.DEFINE_list("chunks", ["0", "64", "256", "512"],
                            "New tokens of the long sequence in the mixed step.")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timing rounds per table.")


def kv_bytes_per_token(kh: int, h: int) -> int:
  """Bytes of K+V one float32 token holds."""
  return 2 * kh * h * 4


def paged_cache(num_seqs, fills, reserve_to, cfg, seed=0) -> paged.PagedCache:
  """A pool with random pages; slot i holds fills[i] tokens and pages for reserve_to[i].

  The pool has just the pages reserved (and one more). They are reserved one
  per slot in turn, so each slot's pages interleave with the others' (as
  after many decode steps), not contiguous.
  """
  n, kh, h, max_len, ps = cfg
  pages_per_seq = -(-max_len // ps)
  num_pages = sum(-(-int(t) // ps) for t in reserve_to) + 1
  cache = paged.init_paged_cache(num_pages, ps, num_seqs, pages_per_seq, kh, h)
  slots = jnp.arange(num_seqs, dtype=jnp.int32)
  reserve = jax.jit(paged.reserve)
  target = np.asarray(reserve_to)
  for r in range(-(-int(target.max()) // ps)):
    counts = np.clip(target - r * ps, 0, ps).astype(np.int32)
    held = np.minimum(r * ps, -(-target // ps) * ps).astype(np.int32)  # Full pages so far.
    cache = cache._replace(lengths=jnp.asarray(held))
    cache, fits = reserve(cache, slots, jnp.asarray(counts))
    assert bool(jnp.all(fits))
  rng = np.random.default_rng(seed)
  shape = cache.k_pages.shape
  return cache._replace(k_pages=jnp.asarray(rng.standard_normal(shape, np.float32)),
                        v_pages=jnp.asarray(rng.standard_normal(shape, np.float32)),
                        lengths=jnp.asarray(np.asarray(fills, np.int32)))


def dense_cache(b, fill, cfg, seed=0) -> kvattn.KVCache:
  n, kh, h, max_len, _ = cfg
  cache = kvattn.init_cache(b, max_len, kh, h)
  rng = np.random.default_rng(seed)
  return cache._replace(k=jnp.asarray(rng.standard_normal(cache.k.shape, np.float32)),
                        v=jnp.asarray(rng.standard_normal(cache.v.shape, np.float32)),
                        valid=jnp.asarray(np.arange(max_len)[None].repeat(b, 0) < fill),
                        lengths=jnp.full((b,), fill, jnp.int32), index=jnp.asarray(fill, jnp.int32))


def paged_calls(step, cache, q, k, v, slots, cu, num_seqs) -> timing.Stateful:
  """Calls the jitted paged step with the cache donated; resets the lengths between calls."""
  state = {"cache": cache}
  lengths = np.asarray(cache.lengths)  # A host copy: the cache's own buffer is donated.

  def run():
    out, state["cache"] = step(q, k, v, state["cache"], slots, cu, num_seqs)
    return out

  def reset():
    state["cache"] = state["cache"]._replace(lengths=jnp.asarray(lengths))

  return timing.Stateful(run, reset)


def decode_table(b, fills, cfg, rounds) -> float:
  n, kh, h, max_len, ps = cfg
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, n, h), np.float32))
  kv = jnp.asarray(rng.standard_normal((b, kh, h), np.float32))
  dense = jax.jit(lambda q, k, v, c: kvattn.cached_attention(q, k, v, c), donate_argnums=3)
  step = jax.jit(paged.paged_attention, donate_argnums=3)
  slots, cu = jnp.arange(b, dtype=jnp.int32), jnp.arange(b + 1, dtype=jnp.int32)
  cases = {}
  for fill in fills:
    cases[(fill, "dense")] = timing.donated_calls(dense, dense_cache(b, fill, cfg), q[:, None],
                                                  kv[:, None], kv[:, None], index=fill)
    cache = paged_cache(b, [fill] * b, [fill + 1] * b, cfg)
    cases[(fill, "paged")] = paged_calls(step, cache, q, kv, kv, slots, cu,
                                         jnp.asarray(b, jnp.int32))
  times = timing.time_interleaved(cases, rounds)
  print(f"\n## Decode step: paged against dense (B={b}, N={n}, K={kh}, H={h}, float32, "
        f"pages of {ps}, dense S={max_len})\n")
  print("`paged_attention` with one token for each of B sequences (pages interleaved across "
        "sequences) against `cached_attention` with T=1 at the same fill.\n")
  print("| fill | dense ms | dense min | paged ms | paged min | paged / dense | of the minima |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  worst = 0.0
  for fill in fills:
    d, p = times[(fill, "dense")], times[(fill, "paged")]
    worst = max(worst, p[0] / d[0])
    print(f"| {fill} | {d[0]:.3f} | {d[1]:.3f} | {p[0]:.3f} | {p[1]:.3f} | {p[0] / d[0]:.2f} | "
          f"{p[1] / d[1]:.2f} |")
  return worst


def mixed_table(short, short_fill, long_fill, chunks, cfg, rounds) -> None:
  n, kh, h, max_len, _ = cfg
  b = short + 1
  tt = max(chunks) + short  # One compiled step for every row of the table.
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((tt, n, h), np.float32))
  kv = jnp.asarray(rng.standard_normal((tt, kh, h), np.float32))
  step = jax.jit(paged.paged_attention, donate_argnums=3)
  fills = [long_fill] + [short_fill] * short
  cases = {}
  for chunk in chunks:
    reserve_to = [long_fill + chunk] + [short_fill + 1] * short
    # Slot 0 (the long sequence) first, then one token per short sequence, then padding.
    mixed = np.minimum(np.array([0, chunk] + [chunk + i for i in range(1, short + 1)]), tt)
    alone = np.array([0, chunk] + [chunk] * short)
    decodes = np.array([0, 0] + list(range(1, short + 1)))
    slots = jnp.arange(b, dtype=jnp.int32)
    for name, cu in (("mixed", mixed), ("chunk", alone), ("decode", decodes)):
      if name != "mixed" and chunk == 0:  # The same call as "mixed".
        continue
      cache = paged_cache(b, fills, reserve_to, cfg)
      cases[(chunk, name)] = paged_calls(step, cache, q, kv, kv, slots, jnp.asarray(cu, jnp.int32),
                                         jnp.asarray(b, jnp.int32))
  times = timing.time_interleaved(cases, rounds)
  print(f"\n## A mixed step: one long sequence's chunk beside {short} decode tokens "
        f"(N={n}, K={kh}, H={h}, float32)\n")
  print(f"The long sequence holds {long_fill} tokens, each short one {short_fill}. One compiled "
        f"step of TT={tt} rows serves every row of the table (the rest is padding). `chunk "
        "alone` and `decodes alone` are the same step with only those sequences' tokens (the "
        "row of chunk 0 is the decodes alone). The last two columns take the minima.\n")
  print("| chunk | tokens | mixed ms | mixed min | chunk alone min | decodes alone min | "
        "mixed / (chunk + decodes) | us / token |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for chunk in chunks:
    m = times[(chunk, "mixed")]
    c = times[(chunk, "chunk")][1] if chunk else 0.0
    d = times[(chunk, "decode")][1] if chunk else m[1]
    tokens = chunk + short
    print(f"| {chunk} | {tokens} | {m[0]:.3f} | {m[1]:.3f} | {c:.3f} | {d:.3f} | "
          f"{m[1] / (c + d):.2f} | {1e3 * m[1] / tokens:.1f} |")


def memory_table(short, short_fill, long_fill, cfg) -> None:
  n, kh, h, max_len, ps = cfg
  b = short + 1
  lengths = [long_fill] + [short_fill] * short
  cache = paged_cache(b, lengths, lengths, cfg)
  per_token = kv_bytes_per_token(kh, h)
  used = int(paged.pages_in_use(cache))
  print(f"\n## Memory held: {b} sequences, one of {long_fill} tokens and {short} of "
        f"{short_fill} (K={kh}, H={h}, float32)\n")
  print("| cache | tokens held | KiB |")
  print("| --- | ---: | ---: |")
  print(f"| dense, {b} rows x max_len {max_len} | {b * max_len} | "
        f"{b * max_len * per_token / 1024:.0f} |")
  print(f"| paged, {used} pages of {ps} in use | {used * ps} | "
        f"{used * ps * per_token / 1024:.0f} |")
  print(f"| the tokens themselves | {sum(lengths)} | {sum(lengths) * per_token / 1024:.0f} |")
  tt = 64 + short
  step = jax.jit(paged.paged_attention, donate_argnums=3)
  temps = {}
  for pages in (cache.num_pages, 4 * cache.num_pages):
    pool = paged.init_paged_cache(pages, ps, b, cache.pages_per_seq, kh, h)
    args = (jnp.zeros((tt, n, h)), jnp.zeros((tt, kh, h)), jnp.zeros(
        (tt, kh, h)), pool, jnp.arange(b, dtype=jnp.int32), jnp.zeros((b + 1,), jnp.int32), b)
    stats = step.lower(*args).compile().memory_analysis()
    temps[pages] = (stats.temp_size_in_bytes, pool.k_pages.nbytes * 2)
  print(f"\nThe compiled step (TT={tt}) allocates the same temporaries whatever the pool:\n")
  print("| pool pages | pool KiB | temp KiB |")
  print("| ---: | ---: | ---: |")
  for pages, (temp, pool_bytes) in temps.items():
    print(f"| {pages} | {pool_bytes / 1024:.0f} | {temp / 1024:.0f} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _QUICK.value:
    cfg = (4, 2, 16, 256, 8)
    b, fills, rounds = 2, [16, 200], 3
    short, short_fill, long_fill, chunks = 3, 16, 64, [0, 32]
  else:
    cfg = (_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _MAX_LEN.value, _PAGE_SIZE.value)
    b, fills, rounds = _BATCH.value, [int(f) for f in _FILLS.value], _ROUNDS.value
    short, short_fill, long_fill = _SHORT.value, _SHORT_FILL.value, _LONG_FILL.value
    chunks = [int(c) for c in _CHUNKS.value]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  worst = decode_table(b, fills, cfg, rounds)
  mixed_table(short, short_fill, long_fill, chunks, cfg, rounds)
  memory_table(short, short_fill, long_fill, cfg)
  verdict = "met" if worst <= 1.2 else "not met"
  print(f"\nGoal: paged decode within 1.2x of dense at every fill: {verdict} "
        f"(worst {worst:.2f}x).")


if __name__ == "__main__":
  app.run(main)
