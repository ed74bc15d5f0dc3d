"""Benchmarks kvattn on this machine and prints the tables of the README.

Everything is timed side by side in one process: the variants of a table run
interleaved, round after round, and each cell is the median over rounds (the
prefill table prints the minimum too). Caches are donated, as in real use.

  1. Prefill of a prompt: the kernel against `jax.nn.dot_product_attention`
     (full causal forward, same q, k, v), and the layer against forcing the
     prompt through `decode_step` one token at a time.
  2. Decode step at several fills of one cache, float32 and int8: ms, the
     bytes of filled K+V read per step over the time (GB/s), and that time
     over the floor set by this machine's copy bandwidth; beside it, a loop
     that only copies the same blocks out of the cache and sums them, the
     cost XLA:CPU puts on any loop over dynamic slices.
  3. The whole bundled char-LM (examples/charlm.py): greedy generation for a
     batch of prompts, prefill ms and decode tokens/s.
  4. The goals of the speed issue, met or not.

Usage:
  python examples/benchmark.py           # B=4, N=K=8, H=64, S=2048, prompt 512
  python examples/benchmark.py --quick   # small sizes, under a minute (CI)
"""

from __future__ import annotations

import functools
import os
import pathlib
import platform
import sys
import time
from typing import Callable

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from examples import charlm
import kvattn
from kvattn import quant
from kvattn import sampling

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes and few rounds, for CI.")
_BATCH = flags.DEFINE_integer("batch", 4, "B.")
_HEADS = flags.DEFINE_integer("heads", 8, "N, query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "K, key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "H.")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "S, cache capacity.")
_PROMPT = flags.DEFINE_integer("prompt", 512, "T, prompt length for prefill.")
_FILLS = flags.DEFINE_list("fills", ["1", "64", "256", "512", "1024", "1984"],
                           "Cache fills at which a decode step is timed.")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timing rounds per table.")
_BANDWIDTH_MIB = flags.DEFINE_integer(
    "bandwidth_mib", 256, "Size of the array copied to measure bandwidth; "
    "larger than the last-level cache.")


class Stateful:
  """A timed call plus an untimed reset between calls (e.g. of a donated cache)."""

  def __init__(self, run: Callable[[], object], reset: Callable[[], None] = lambda: None):
    self.run = run
    self.reset = reset


def time_interleaved(cases: dict[str, Stateful], rounds: int) -> dict[str, tuple[float, float]]:
  """Runs every case once per round, in turn; returns {name: (median ms, min ms)}."""
  for case in cases.values():  # Compile and warm up.
    jax.block_until_ready(case.run())
    case.reset()
  times = {name: [] for name in cases}
  for _ in range(rounds):
    for name, case in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(case.run())
      times[name].append((time.perf_counter() - start) * 1e3)
      case.reset()
  return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def machine() -> str:
  model = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  return (f"{model}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}")


def copy_bandwidth(mib: int, rounds: int) -> tuple[float, float]:
  """GB/s of a donated in-place `x + 1` (bytes read + written), and of a sum (read)."""
  n = mib * 2**20 // 4
  state = {"x": jnp.zeros((n,), jnp.float32)}
  add = jax.jit(lambda x: x + 1, donate_argnums=0)
  total = jax.jit(jnp.sum)

  def copy():
    state["x"] = add(state["x"])
    return state["x"]

  t = time_interleaved({"copy": Stateful(copy), "read": Stateful(lambda: total(state["x"]))},
                       rounds)
  nbytes = n * 4
  return 2 * nbytes / t["copy"][0] / 1e6, nbytes / t["read"][0] / 1e6


def filled_cache(b, s, kh, h, fill, quantized, seed=0) -> kvattn.KVCache:
  """A cache with random keys and values whose first `fill` slots are valid."""
  cache = kvattn.init_cache(b, s, kh, h, quantized=quantized)
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((b, s, kh, h), np.float32)
  v = rng.standard_normal((b, s, kh, h), np.float32)
  if quantized:
    (k, k_scale), (v, v_scale) = quant.quantize(k), quant.quantize(v)
    cache = cache._replace(k_scale=k_scale, v_scale=v_scale)
  return cache._replace(
      k=jnp.asarray(k), v=jnp.asarray(v),
      valid=jnp.asarray(np.arange(s)[None].repeat(b, 0) < fill),
      lengths=jnp.full((b,), fill, jnp.int32), index=jnp.asarray(fill, jnp.int32))


def donated_calls(fn, cache, *args, index: int | None = None) -> Stateful:
  """Calls fn(*args, cache) -> (out, cache) with the cache donated, resetting its index."""
  state = {"cache": cache}

  def run():
    out, state["cache"] = fn(*args, state["cache"])
    return out

  def reset():
    if index is not None:
      state["cache"] = state["cache"]._replace(index=jnp.asarray(index, jnp.int32))

  return Stateful(run, reset)


def prefill_table(cfg, rounds) -> dict[str, float]:
  b, n, kh, h, s, t = cfg
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
  k = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  v = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  kernel = jax.jit(lambda q, k, v, c: kvattn.cached_attention(q, k, v, c), donate_argnums=3)
  reference = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True))
  kernel_times = time_interleaved({
      "kvattn.cached_attention (prefill at index 0, cache write included)":
          donated_calls(kernel, kvattn.init_cache(b, s, kh, h), q, k, v, index=0),
      "jax.nn.dot_product_attention(is_causal=True), no cache":
          Stateful(lambda: reference(q, k, v)),
  }, rounds)

  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h)
  x = jnp.asarray(rng.standard_normal((b, t, dm), np.float32))
  prefill = jax.jit(lambda p, x, c: kvattn.prefill(p, c, x), donate_argnums=2)
  decode = jax.jit(lambda p, x, c: kvattn.decode_step(p, c, x), donate_argnums=2)
  tokens = [x[:, i:i + 1] for i in range(t)]
  state = {"cache": kvattn.init_cache(b, s, kh, h)}

  def by_decode_steps():
    for token in tokens:
      out, state["cache"] = decode(params, token, state["cache"])
    return out

  def fresh():
    state["cache"] = kvattn.init_cache(b, s, kh, h)

  layer_times = time_interleaved({
      f"kvattn.prefill of {t} tokens": donated_calls(prefill, kvattn.init_cache(b, s, kh, h),
                                                      params, x, index=0),
      f"{t} x kvattn.decode_step (jitted, donated)": Stateful(by_decode_steps, fresh),
  }, max(3, rounds // 6))

  print(f"\n## Prefill, prompt T={t} (B={b}, N={n}, K={kh}, H={h}, S={s}, float32)\n")
  print("| what | median ms | min ms | ratio (median) |")
  print("| --- | ---: | ---: | ---: |")
  for times in (kernel_times, layer_times):
    names = list(times)
    base = times[names[1]][0]
    for name in names:
      print(f"| {name} | {times[name][0]:.2f} | {times[name][1]:.2f} | "
            f"{times[name][0] / base:.3f} |")
  first = list(kernel_times)
  second = list(layer_times)
  # Multiply-adds of the four projections plus causal attention (QK^T and PV).
  flops = 2 * b * t * dm * (2 * n + 2 * kh) * h + 2 * 2 * b * n * h * t * (t + 1) / 2
  print(f"\nkvattn.prefill runs at {flops / layer_times[second[0]][0] / 1e6:.1f} GFLOP/s; "
        f"a decode step costs {layer_times[second[1]][0] / t:.2f} ms on average.")
  return {
      "prefill_vs_dpa": kernel_times[first[0]][0] / kernel_times[first[1]][0],
      "prefill_vs_decode_steps": layer_times[second[0]][0] / layer_times[second[1]][0],
  }


def slice_and_sum(k, v, end, block):
  """Only reads the blocks a decode step reads: dynamic slices of k and v, summed.

  On XLA:CPU a matmul or reduction cannot read a dynamic slice in place, so
  each block is first copied out; this loop is the cost of that alone, a
  lower bound for any kernel whose trip count is traced.
  """
  def body(j, acc):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)
    return acc + jnp.sum(take(k)) + jnp.sum(take(v))
  return jax.lax.fori_loop(0, (end + block - 1) // block, body, jnp.float32(0))


def decode_table(cfg, fills, rounds, copy_gbs) -> dict[str, float]:
  b, n, kh, h, s, _ = cfg
  q = jnp.asarray(np.random.default_rng(2).standard_normal((b, 1, n, h), np.float32))
  kv = q[:, :, :kh]
  kernel = jax.jit(lambda q, k, v, c: kvattn.cached_attention(q, k, v, c), donate_argnums=3)
  block = min(kvattn.attention.BLOCK_KV, s)
  bound = jax.jit(functools.partial(slice_and_sum, block=block))
  cases = {}
  for fill in fills:
    for quantized in (False, True):
      cache = filled_cache(b, s, kh, h, fill, quantized)
      cases[(fill, quantized)] = donated_calls(kernel, cache, q, kv, kv, index=fill)
    plain = filled_cache(b, s, kh, h, fill, False)  # Not donated: read only.
    end = jnp.asarray(fill, jnp.int32)
    cases[(fill, "bound")] = Stateful(functools.partial(bound, plain.k, plain.v, end))
  times = time_interleaved(cases, rounds)

  print(f"\n## Decode step, one cache of S={s} (B={b}, N={n}, K={kh}, H={h}), "
        f"kernel `cached_attention` with T=1\n")
  print(f"Floor: bytes of filled K+V (and int8 scales) / copy bandwidth {copy_gbs:.1f} GB/s. "
        f"Slice-and-sum: a loop that only copies out and sums the same {block}-slot blocks "
        "of the float32 cache (`slice_and_sum`), the least a traced trip count costs here.\n")
  print("| fill | f32 ms | f32 GB/s | f32 / floor | int8 ms | int8 GB/s | int8 / floor "
        "| slice-and-sum ms | its / floor |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  per_slot = {False: b * kh * h * 4 * 2, True: b * kh * (h + 4) * 2, "bound": b * kh * h * 4 * 2}
  for fill in fills:
    row = [str(fill)]
    for kind in (False, True, "bound"):
      ms = times[(fill, kind)][0]
      nbytes = fill * per_slot[kind]
      floor_ms = nbytes / copy_gbs / 1e6
      row += [f"{ms:.3f}"] + ([] if kind == "bound" else [f"{nbytes / ms / 1e6:.1f}"])
      row += [f"{ms / floor_ms:.2f}"]
    print("| " + " | ".join(row) + " |")
  low, high = fills[1] if len(fills) > 1 else fills[0], fills[-1]
  high_bytes = high * per_slot[False]
  return {
      "decode_low_vs_high": times[(low, False)][0] / times[(high, False)][0],
      "decode_high_vs_floor": times[(high, False)][0] / (high_bytes / copy_gbs / 1e6),
      "bound_high_vs_floor": times[(high, "bound")][0] / (high_bytes / copy_gbs / 1e6),
      "low": low, "high": high,
  }


def model_table(batch: int, max_new_tokens: int) -> None:
  """Greedy generation with the bundled char-LM: the whole model, end to end."""
  params, config, vocab = charlm.load()
  prompts = ["def ", "class Stack:\n    def push(self, item):\n        "] * (batch // 2)
  _, _, lengths, timing = charlm.generate_text(
      params, config, vocab, prompts, max_new_tokens=max_new_tokens,
      sampler=sampling.Sampler(temperature=0.0))
  rate = timing.decode_tokens / max(timing.decode_s, 1e-9)
  print(f"\n## Whole model: bundled char-LM ({config.num_layers} layers, d_model "
        f"{config.d_model}), greedy, batch {len(prompts)}, {max_new_tokens} new tokens\n")
  print("| prefill ms | decode tokens/s | ms per decode step | compile s |")
  print("| ---: | ---: | ---: | ---: |")
  steps = max(int(lengths.max()) - 1, 1)
  print(f"| {timing.prefill_s * 1e3:.1f} | {rate:.0f} | {timing.decode_s / steps * 1e3:.2f} | "
        f"{timing.compile_s:.2f} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _QUICK.value:
    cfg = (2, 4, 4, 32, 512, 128)
    fills, rounds, mib = [1, 16, 64, 480], 5, 64
  else:
    cfg = (_BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _MAX_LEN.value,
           _PROMPT.value)
    fills, rounds, mib = [int(f) for f in _FILLS.value], _ROUNDS.value, _BANDWIDTH_MIB.value
  print(f"# kvattn benchmark\n\nMachine: {machine()}")
  copy_gbs, read_gbs = copy_bandwidth(mib, max(5, rounds // 3))
  print(f"Bandwidth over {mib} MiB: copy {copy_gbs:.1f} GB/s (read + write), "
        f"sum {read_gbs:.1f} GB/s (read).")
  results = prefill_table(cfg, rounds)
  results.update(decode_table(cfg, fills, rounds, copy_gbs))

  model_table(batch=2 if _QUICK.value else 8, max_new_tokens=16 if _QUICK.value else 128)

  print("\n## Goals\n")
  print("| goal | measured | met |")
  print("| --- | ---: | :---: |")
  goals = [
      ("prefill <= 1.0x dot_product_attention", results["prefill_vs_dpa"], 1.0),
      ("prefill <= 1/20 of decode steps", results["prefill_vs_decode_steps"], 1 / 20),
      (f"decode fill {results['low']} <= 0.25x fill {results['high']}",
       results["decode_low_vs_high"], 0.25),
      (f"decode fill {results['high']} within 2x of the copy floor",
       results["decode_high_vs_floor"], 2.0),
  ]
  for name, value, bound in goals:
    print(f"| {name} | {value:.3f} | {'yes' if value <= bound else 'no'} |")
  print(f"\nSlice-and-sum at fill {results['high']}: {results['bound_high_vs_floor']:.2f}x "
        "the copy floor.")
  if _QUICK.value:
    print("\n(--quick: sizes too small for the goals, which are set for the full run.)")


if __name__ == "__main__":
  app.run(main)
