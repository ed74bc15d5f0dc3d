r"""Whole-model benchmark: a decoder's compiled decode step at two capacities, two dtypes.

The promise checked here is the one a user meets: a model's decode step costs
what the slots filled cost, not what the cache holds, and its memory does not
grow with the capacity. A random Llama-shaped decoder (by default
SmolLM2-135M's shape: 30 layers, 576 wide, 9 query and 3 kv heads, vocab
49152) runs `kvattn.models.transformer.step` under `jax.jit` with the caches
donated, filled to the same number of tokens, at a small and a large max_len,
in float32 and bfloat16. Every case is timed in one process, interleaved,
round after round (minimum and median per cell); temporaries come from
`compiled.memory_analysis()`.

  python examples/benchmark_models.py                      # full shape
  python examples/benchmark_models.py --num_layers=4 --rounds=5

Prints one markdown table.
"""

from __future__ import annotations

import logging
import pathlib
import platform
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from examples import timing
from kvattn.models import transformer

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_NUM_LAYERS = flags.DEFINE_integer("num_layers", 30, "Layers of the model.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows decoded together.")
_FILL = flags.DEFINE_integer("fill", 128, "Tokens in the caches before the timed steps.")
_CAPACITIES = flags.DEFINE_list("capacities", ["256", "4096"], "The caches' max_len values.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Params and cache dtypes.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds (each case once per round).")


def config(num_layers: int) -> transformer.Config:
  """SmolLM2-135M's shape (random weights)."""
  return transformer.Config(
      vocab_size=49152, num_layers=num_layers, d_model=576, num_heads=9, num_kv_heads=3,
      head_dim=64, d_ff=1536, rope_base=100_000.0, norm="rms_norm", gated_mlp=True,
      activation="silu", use_bias=False, tie_embeddings=True)


def decode_case(cfg, params, dtype, batch: int, capacity: int, fill: int):
  """(a timing case of one decode step at `fill`, temp MiB of the compiled step)."""
  step = jax.jit(transformer.step_fn(cfg), donate_argnums=1)
  caches = transformer.init_caches(cfg, batch, capacity, dtype=dtype)
  prompt = jnp.ones((batch, fill), jnp.int32)
  _, filled = step(params, caches, prompt, None)
  token = jnp.ones((batch, 1), jnp.int32)
  compiled = step.lower(params, filled, token, None).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  start_index = np.asarray(filled.index)
  state = {"caches": filled}

  def run():
    logits, state["caches"] = compiled(params, state["caches"], token, None)
    return logits

  def reset():  # Back to `fill` tokens: every timed step sees the same fill.
    c = state["caches"]
    state["caches"] = c._replace(index=jnp.asarray(start_index), lengths=jnp.full_like(
        c.lengths, fill), valid=c.valid.at[:, :, fill:].set(False))

  return timing.Stateful(run, reset), temp


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config(_NUM_LAYERS.value)
  capacities = [int(c) for c in _CAPACITIES.value]
  if _FILL.value + 1 > min(capacities):
    raise app.UsageError(f"--fill={_FILL.value} needs capacities above it: {capacities}")
  cases, temps = {}, {}
  for name in _DTYPES.value:
    dtype = jnp.dtype(name)
    params = transformer.init_params(jax.random.key(0), cfg, dtype=dtype)
    for capacity in capacities:
      key = (name, capacity)
      cases[key], temps[key] = decode_case(cfg, params, dtype, _BATCH.value, capacity,
                                           _FILL.value)
  times = timing.time_interleaved(cases, _ROUNDS.value)
  print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}; {cfg.num_layers} layers x {cfg.d_model}, "
        f"B={_BATCH.value}, fill {_FILL.value}, min (median) of {_ROUNDS.value} rounds\n")
  print("| dtype | max_len | decode step ms | vs smallest max_len | temp MiB |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for name in _DTYPES.value:
    base = times[(name, capacities[0])][1]
    for capacity in capacities:
      median, low = times[(name, capacity)]
      print(f"| {name} | {capacity} | {low:.1f} ({median:.1f}) | {low / base:.2f}x | "
            f"{temps[(name, capacity)]:.1f} |")


if __name__ == "__main__":
  app.run(main)
