"""Benchmarks kvattn on this machine and prints the tables of docs/performance.md.

Everything is timed side by side in one process: the variants of a table run
interleaved, round after round, and each cell is the median over rounds (the
prefill table prints the minimum too). Caches are donated, as in real use.

  1. Prefill of a prompt: the kernel against `jax.nn.dot_product_attention`
     (full causal forward, same q, k, v), and the layer against the same
     layer's full causal forward written as one masked einsum (the way Flax
     computes it) and against forcing the prompt through `decode_step` one
     token at a time.
  2. Decode step at several fills of one cache, for each storage dtype of
     `--dtypes`: ms, the bytes of filled K+V read per step over the time
     (GB/s), and that time over the floor set by this machine's copy
     bandwidth; beside it, a loop that only copies the same blocks out of
     the cache and sums them, the cost XLA:CPU puts on any loop over dynamic
     slices.
  3. Decode step at fill 64 in a small and a large cache, per dtype: the time
     and the compiled step's temporary memory must not grow with capacity.
  4. Compile time of `prefill` at a short and a long prompt.
  5. The whole bundled char-LM (kvattn.models.charlm): greedy generation for a
     batch of prompts, prefill ms and decode tokens/s.
  6. On an accelerator (or with --suite=accelerator or both), the tables of
     examples/benchmark_accelerator.py: every implementation against a
     whole-cache einsum decode step and jax.nn.dot_product_attention (cuDNN
     on GPU), in bfloat16.
  7. The goals of the speed issues, met or not.

Usage:
  python examples/benchmark.py           # B=4, N=K=8, H=64, S=2048, prompt 512
  python examples/benchmark.py --quick   # small sizes, under a minute (CI)
  python examples/benchmark.py --output=examples/results/cpu.md  # also to a file
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import platform
import sys
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from examples import benchmark_accelerator
from kvattn.models import charlm
from examples import timing
import kvattn
from kvattn import quant
from kvattn import sampling

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes and few rounds, for CI.")
_BATCH = flags.DEFINE_integer("batch", 4, "B.")
_HEADS = flags.DEFINE_integer("heads", 8, "N, query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "K, key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "H.")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "S, cache capacity.")
_PROMPT = flags.DEFINE_integer("prompt", 512, "T, prompt length for prefill.")
_FILLS = flags.DEFINE_list("fills", ["1", "64", "256", "512", "1024", "1984"],
                           "Cache fills at which a decode step is timed.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16", "int8"],
                            "Cache storage dtypes of the decode tables (int8: quantised).")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timing rounds per table.")
_SUITE = flags.DEFINE_enum(
    "suite", "auto", ["auto", "cpu", "accelerator", "both"],
    "Which tables: the CPU speed tables, the accelerator tables "
    "(examples/benchmark_accelerator.py), or both; auto picks by the device.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the tables to this markdown file "
    "(e.g. examples/results/cpu.md).")
_BANDWIDTH_MIB = flags.DEFINE_integer(
    "bandwidth_mib", 256, "Size of the array copied to measure bandwidth; "
    "larger than the last-level cache.")


def machine() -> str:
  device = jax.devices()[0]
  if device.platform != "cpu":
    return (f"{device.device_kind} ({jax.device_count()} x {device.platform}), jax "
            f"{jax.__version__}")
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

  t = timing.time_interleaved(
      {
          "copy": timing.Stateful(copy),
          "read": timing.Stateful(lambda: total(state["x"]))
      }, rounds)
  nbytes = n * 4
  return 2 * nbytes / t["copy"][0] / 1e6, nbytes / t["read"][0] / 1e6


def new_cache(b, s, kh, h, dtype: str) -> kvattn.KVCache:
  """An empty cache of storage dtype "float32", "bfloat16", "float16" or "int8"."""
  if dtype == "int8":
    return kvattn.init_cache(b, s, kh, h, quantized=True)
  return kvattn.init_cache(b, s, kh, h, jnp.dtype(dtype))


def bytes_per_slot(b, kh, h, dtype: str) -> int:
  """Bytes of K+V (and int8 scales) one slot holds across the batch."""
  if dtype == "int8":
    return b * kh * (h + 4) * 2
  return b * kh * h * jnp.dtype(dtype).itemsize * 2


def filled_cache(b, s, kh, h, fill, dtype: str, seed=0) -> kvattn.KVCache:
  """A cache with random keys and values whose first `fill` slots are valid."""
  cache = new_cache(b, s, kh, h, dtype)
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((b, s, kh, h), np.float32)
  v = rng.standard_normal((b, s, kh, h), np.float32)
  if dtype == "int8":
    (k, k_scale), (v, v_scale) = quant.quantize(k), quant.quantize(v)
    cache = cache._replace(k_scale=k_scale, v_scale=v_scale)
  return cache._replace(k=jnp.asarray(k, cache.k.dtype), v=jnp.asarray(v, cache.v.dtype),
                        valid=jnp.asarray(np.arange(s)[None].repeat(b, 0) < fill), lengths=jnp.full(
                            (b,), fill, jnp.int32), index=jnp.asarray(fill, jnp.int32))


def prefill_table(cfg, rounds) -> dict[str, float]:
  b, n, kh, h, s, t = cfg
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
  k = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  v = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  kernel = jax.jit(lambda q, k, v, c: kvattn.cached_attention(q, k, v, c), donate_argnums=3)
  reference = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True))
  kernel_times = timing.time_interleaved(
      {
          "kvattn.cached_attention (prefill at index 0, cache write included)":
              timing.donated_calls(kernel, kvattn.init_cache(b, s, kh, h), q, k, v, index=0),
          "jax.nn.dot_product_attention(is_causal=True), no cache":
              timing.Stateful(lambda: reference(q, k, v)),
      }, rounds)

  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h)
  x = jnp.asarray(rng.standard_normal((b, t, dm), np.float32))
  prefill = jax.jit(lambda p, x, c: kvattn.prefill(p, c, x), donate_argnums=2)
  forward = jax.jit(benchmark_accelerator.einsum_forward)
  einsum_times = timing.time_interleaved(
      {
          f"kvattn.prefill of {t} tokens": timing.donated_calls(
              prefill, kvattn.init_cache(b, s, kh, h), params, x, index=0),
          "full causal forward, one masked einsum (Flax's way), no cache":
              timing.Stateful(lambda: forward(params, x)),
      }, rounds)

  decode = jax.jit(lambda p, x, c: kvattn.decode_step(p, c, x), donate_argnums=2)
  tokens = [x[:, i:i + 1] for i in range(t)]
  state = {"cache": kvattn.init_cache(b, s, kh, h)}

  def by_decode_steps():
    for token in tokens:
      out, state["cache"] = decode(params, token, state["cache"])
    return out

  def fresh():
    state["cache"] = kvattn.init_cache(b, s, kh, h)

  layer_times = timing.time_interleaved(
      {
          f"kvattn.prefill of {t} tokens": timing.donated_calls(
              prefill, kvattn.init_cache(b, s, kh, h), params, x, index=0),
          f"{t} x kvattn.decode_step (jitted, donated)": timing.Stateful(by_decode_steps, fresh),
      }, max(3, rounds // 6))

  print(f"\n## Prefill, prompt T={t} (B={b}, N={n}, K={kh}, H={h}, S={s}, float32)\n")
  print("| what | median ms | min ms | ratio (median) |")
  print("| --- | ---: | ---: | ---: |")
  for times in (kernel_times, einsum_times, layer_times):
    names = list(times)
    base = times[names[1]][0]
    for name in names:
      print(f"| {name} | {times[name][0]:.2f} | {times[name][1]:.2f} | "
            f"{times[name][0] / base:.3f} |")
  first, second, third = list(kernel_times), list(einsum_times), list(layer_times)
  # Multiply-adds of the four projections plus causal attention (QK^T and PV).
  flops = 2 * b * t * dm * (2 * n + 2 * kh) * h + 2 * 2 * b * n * h * t * (t + 1) / 2
  print(f"\nkvattn.prefill runs at {flops / layer_times[third[0]][0] / 1e6:.1f} GFLOP/s; "
        f"a decode step costs {layer_times[third[1]][0] / t:.2f} ms on average.")
  return {
      "prefill_vs_dpa": kernel_times[first[0]][0] / kernel_times[first[1]][0],
      "prefill_vs_einsum": einsum_times[second[0]][0] / einsum_times[second[1]][0],
      "prefill_vs_decode_steps": layer_times[third[0]][0] / layer_times[third[1]][0],
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


def decode_table(cfg, fills, dtypes, rounds, copy_gbs) -> dict[str, float]:
  b, n, kh, h, s, _ = cfg
  q = jnp.asarray(np.random.default_rng(2).standard_normal((b, 1, n, h), np.float32))
  kv = q[:, :, :kh]
  kernel = jax.jit(lambda q, k, v, c: kvattn.cached_attention(q, k, v, c), donate_argnums=3)
  block = min(kvattn.kernels.xla.BLOCK_KV, s)
  bound = jax.jit(functools.partial(slice_and_sum, block=block))
  cases = {}
  for fill in fills:
    for dtype in dtypes:
      cache = filled_cache(b, s, kh, h, fill, dtype)
      cases[(fill, dtype)] = timing.donated_calls(kernel, cache, q, kv, kv, index=fill)
    plain = filled_cache(b, s, kh, h, fill, "float32")  # Not donated: read only.
    end = jnp.asarray(fill, jnp.int32)
    cases[(fill, "bound")] = timing.Stateful(functools.partial(bound, plain.k, plain.v, end))
  times = timing.time_interleaved(cases, rounds)

  print(f"\n## Decode step, one cache of S={s} (B={b}, N={n}, K={kh}, H={h}), "
        f"kernel `cached_attention` with T=1\n")
  print(f"Floor: bytes of filled K+V (and int8 scales) / copy bandwidth {copy_gbs:.1f} GB/s. "
        f"Slice-and-sum: a loop that only copies out and sums the same {block}-slot blocks "
        "of the float32 cache (`slice_and_sum`), the least a traced trip count costs here.\n")
  header = ["fill"]
  for dtype in dtypes:
    header += [f"{dtype} ms", f"{dtype} GB/s", f"{dtype} / floor"]
  header += ["slice-and-sum ms", "its / floor"]
  print("| " + " | ".join(header) + " |")
  print("|" + " ---: |" * len(header))
  for fill in fills:
    row = [str(fill)]
    for kind in (*dtypes, "bound"):
      ms = times[(fill, kind)][0]
      nbytes = fill * bytes_per_slot(b, kh, h, "float32" if kind == "bound" else kind)
      floor_ms = nbytes / copy_gbs / 1e6
      row += [f"{ms:.3f}"] + ([] if kind == "bound" else [f"{nbytes / ms / 1e6:.1f}"])
      row += [f"{ms / floor_ms:.2f}"]
    print("| " + " | ".join(row) + " |")
  low, high = fills[1] if len(fills) > 1 else fills[0], fills[-1]
  high_bytes = high * bytes_per_slot(b, kh, h, "float32")
  first = dtypes[0]
  return {
      "decode_low_vs_high": times[(low, first)][0] / times[(high, first)][0],
      "decode_high_vs_floor": times[(high, first)][0] / (high_bytes / copy_gbs / 1e6),
      "bound_high_vs_floor": times[(high, "bound")][0] / (high_bytes / copy_gbs / 1e6),
      "low": low,
      "high": high,
      "first_dtype": first,
  }


def capacity_table(b, n, kh, h, capacities, dtypes, rounds) -> dict[str, float]:
  """decode_step at fill 64 in caches of several capacities: time and temp memory."""
  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((b, 1, dm), np.float32))
  step = jax.jit(lambda p, x, c: kvattn.decode_step(p, c, x), donate_argnums=2)
  fill = 64
  cases, temps = {}, {}
  for dtype in dtypes:
    for s in capacities:
      cache = filled_cache(b, s, kh, h, fill, dtype)
      stats = step.lower(params, x, cache).compile().memory_analysis()
      temps[(dtype, s)] = stats.temp_size_in_bytes
      cases[(dtype, s)] = timing.donated_calls(step, cache, params, x, index=fill)
  times = timing.time_interleaved(cases, rounds)
  small, large = capacities[0], capacities[-1]
  print(f"\n## Decode step at fill {fill} by capacity (B={b}, N={n}, K={kh}, H={h}), "
        "`decode_step` donated\n")
  print("Temp: the compiled step's temporary memory (`memory_analysis()`); it must not "
        "grow with S.\n")
  print("| dtype | " + " | ".join(f"S={s} ms" for s in capacities) + " | ratio | " +
        " | ".join(f"S={s} temp KiB" for s in capacities) + " | cache KiB at S=" + f"{large} |")
  print("| --- |" + " ---: |" * (2 * len(capacities) + 2))
  results = {}
  for dtype in dtypes:
    ratio = times[(dtype, large)][0] / times[(dtype, small)][0]
    results[dtype] = ratio
    cache_kib = large * bytes_per_slot(b, kh, h, dtype) / 1024
    print(f"| {dtype} | " + " | ".join(f"{times[(dtype, s)][0]:.3f}" for s in capacities) +
          f" | {ratio:.2f} | " + " | ".join(f"{temps[(dtype, s)] / 1024:.0f}" for s in capacities) +
          f" | {cache_kib:.0f} |")
  results["temp_flat"] = all(temps[(d, small)] == temps[(d, large)] for d in dtypes)
  return results


def compile_table(b, n, kh, h, prompts, max_len) -> float:
  """Seconds to lower and compile `prefill` for each prompt length, on a fresh jit."""
  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h)
  cache = kvattn.init_cache(b, max_len, kh, h)
  seconds = {}
  for t in prompts:
    x = jnp.zeros((b, t, dm), jnp.float32)
    fn = jax.jit(lambda p, c, x: kvattn.prefill(p, c, x))  # A new function: no cache hit.
    start = time.perf_counter()
    fn.lower(params, cache, x).compile()
    seconds[t] = time.perf_counter() - start
  print(f"\n## Compile time of `prefill` (B={b}, N={n}, K={kh}, H={h}, S={max_len})\n")
  print("| prompt T | lower + compile s |")
  print("| ---: | ---: |")
  for t in prompts:
    print(f"| {t} | {seconds[t]:.2f} |")
  return seconds[prompts[-1]] / seconds[prompts[0]]


def model_table(batch: int, max_new_tokens: int) -> None:
  """Greedy generation with the bundled char-LM: the whole model, end to end."""
  params, config, vocab = charlm.load()
  prompts = ["def ", "class Stack:\n    def push(self, item):\n        "] * (batch // 2)
  _, _, lengths, timing = charlm.generate_text(params, config, vocab, prompts,
                                               max_new_tokens=max_new_tokens,
                                               sampler=sampling.Sampler(temperature=0.0))
  rate = timing.decode_tokens / max(timing.decode_s, 1e-9)
  print(f"\n## Whole model: bundled char-LM ({config.num_layers} layers, d_model "
        f"{config.d_model}), greedy, batch {len(prompts)}, {max_new_tokens} new tokens\n")
  print("| prefill ms | decode tokens/s | ms per decode step | compile s |")
  print("| ---: | ---: | ---: | ---: |")
  steps = max(int(lengths.max()) - 1, 1)
  print(f"| {timing.prefill_s * 1e3:.1f} | {rate:.0f} | {timing.decode_s / steps * 1e3:.2f} | "
        f"{timing.compile_s:.2f} |")


class _Tee:
  """Writes to stdout and to a file."""
  def __init__(self, *streams):
    self.streams = streams

  def write(self, text):
    for stream in self.streams:
      stream.write(text)

  def flush(self):
    for stream in self.streams:
      stream.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _OUTPUT.value is None:
    run()
    return
  path = pathlib.Path(_OUTPUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f, contextlib.redirect_stdout(_Tee(sys.stdout, f)):
    run()


def run():
  dtypes = list(_DTYPES.value)
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16", "float16", "int8"):
      raise app.UsageError(f"--dtypes: unknown dtype {dtype!r}")
  quick = _QUICK.value
  rounds = 5 if quick else _ROUNDS.value
  mib = 64 if quick else _BANDWIDTH_MIB.value
  suite = _SUITE.value
  if suite == "auto":
    suite = "cpu" if jax.devices()[0].platform == "cpu" else "accelerator"
  print(f"# kvattn benchmark\n\nMachine: {machine()}")
  copy_gbs, read_gbs = copy_bandwidth(mib, max(5, rounds // 3))
  print(f"Bandwidth over {mib} MiB: copy {copy_gbs:.1f} GB/s (read + write), "
        f"sum {read_gbs:.1f} GB/s (read).")
  goals = []
  if suite in ("cpu", "both"):
    goals += cpu_tables(dtypes, quick, rounds, copy_gbs)
  if suite in ("accelerator", "both"):
    if quick:  # Tiny sizes: on CPU the Pallas kernels run interpreted.
      cfg, fills = (1, 4, (4, 2), 16, 64, 32, jnp.bfloat16), [4, 32, 60]
    else:
      cfg = (8, 32, (32, 8), 128, 8192, 2048, jnp.bfloat16)
      fills = [64, 2048, 8128]
    goals += benchmark_accelerator.tables(cfg, fills, max(3, rounds // 3), copy_gbs)
  print("\n## Goals\n")
  print("| goal | measured | met |")
  print("| --- | ---: | :---: |")
  for name, value, bound, *op in goals:
    met = value >= bound if op == [">="] else value <= bound
    print(f"| {name} | {value:.3f} | {'yes' if met else 'no'} |")
  if quick:
    print("\n(--quick: sizes too small for the goals, which are set for the full run.)")


def cpu_tables(dtypes, quick, rounds, copy_gbs) -> list[tuple]:
  """The tables of the CPU speed work; returns their goals."""
  if quick:
    cfg = (2, 4, 4, 32, 512, 128)
    fills = [1, 16, 64, 480]
    capacities, prompts = [256, 2048], [64, 512]
  else:
    cfg = (_BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _MAX_LEN.value,
           _PROMPT.value)
    fills = [int(f) for f in _FILLS.value]
    capacities, prompts = [1024, 8192], [512, 8192]
  results = prefill_table(cfg, rounds)
  results.update(decode_table(cfg, fills, dtypes, rounds, copy_gbs))
  # The setting: B=2, N=K=8, H=64.
  capacity = capacity_table(2, 8, 8, 64, capacities, dtypes, rounds)
  compile_ratio = compile_table(1, 8, 8, 64, prompts, max(prompts))
  model_table(batch=2 if quick else 8, max_new_tokens=16 if quick else 128)
  print(f"\nSlice-and-sum at fill {results['high']}: {results['bound_high_vs_floor']:.2f}x "
        "the copy floor.")
  goals = [
      ("kernel prefill <= 1.0x dot_product_attention", results["prefill_vs_dpa"], 1.0),
      ("layer prefill <= 1.0x the masked-einsum forward", results["prefill_vs_einsum"], 1.0),
      ("prefill <= 1/20 of decode steps", results["prefill_vs_decode_steps"], 1 / 20),
      (f"decode fill {results['low']} <= 0.25x fill {results['high']} "
       f"({results['first_dtype']})", results["decode_low_vs_high"], 0.25),
      (f"decode fill {results['high']} within 2x of the copy floor ({results['first_dtype']})",
       results["decode_high_vs_floor"], 2.0),
  ]
  goals += [(f"{dtype} decode step at fill 64: S={capacities[-1]} within 2x of "
             f"S={capacities[0]}", capacity[dtype], 2.0) for dtype in dtypes]
  goals += [(f"compile prefill at T={prompts[-1]} within 1.5x of T={prompts[0]}", compile_ratio,
             1.5)]
  goals += [(f"decode temp memory the same at S={capacities[0]} and S={capacities[-1]} "
             f"({', '.join(dtypes)}): 1 if so", float(capacity["temp_flat"]), 1.0, ">=")]
  return goals


if __name__ == "__main__":
  app.run(main)
