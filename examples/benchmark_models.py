r"""Whole-model benchmarks: the compiled decode step, and generation against transformers.

The promises checked here are the ones a user meets. A random Llama-shaped
decoder (by default SmolLM2-135M's shape: 30 layers, 576 wide, 9 query and
3 kv heads, vocab 49152):

  * "steps": `kvattn.models.transformer.step` under `jax.jit` with the caches
    donated, filled to the same number of tokens, at a small and a large
    max_len, float32 (stacked layers) and bfloat16 (stacked, and per-layer
    params from `transformer.unstack_layers`): step time and the compiled
    step's temporaries (`memory_analysis()`).
  * "generate" (needs torch and transformers): a random checkpoint written by
    transformers' `save_pretrained`, loaded by `kvattn.models.llama.load` and
    by `from_pretrained`, then greedy generation of the same prompts (batch 1,
    and a ragged batch 8, left-padded) by `kvattn.generate` and by
    transformers' `generate`: load time, time to first token, decode tokens/s,
    compile time apart, and whether the tokens agree (float32).

Every case is timed in one process, interleaved, round after round (minimum
and median per cell).

  python examples/benchmark_models.py                       # both suites
  python examples/benchmark_models.py --suite=steps --num_layers=4 --rounds=5

Prints markdown tables.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from examples import timing
from kvattn import generation
from kvattn import sampling
from kvattn.models import llama
from kvattn.models import transformer

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

SUITES = ("steps", "generate")

_SUITE = flags.DEFINE_list("suite", list(SUITES), f"Which of {SUITES} to run.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 30, "Layers of the model.")
_BATCH = flags.DEFINE_integer("batch", 8, "steps: rows decoded together.")
_FILL = flags.DEFINE_integer("fill", 128, "steps: tokens in the caches before the timed steps.")
_CAPACITIES = flags.DEFINE_list("capacities", ["256", "4096"], "steps: the caches' max_len.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "generate: the longest prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "generate: tokens generated per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (each case once per round).")

# (params dtype, per-layer params): the layouts each suite times.
LAYOUTS = {
    "float32": ("float32", False),
    "bfloat16 stacked": ("bfloat16", False),
    "bfloat16 unstacked": ("bfloat16", True)
}


def hf_config(num_layers: int) -> dict:
  """SmolLM2-135M's config.json fields (a random model of its shape)."""
  return dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
              num_hidden_layers=num_layers, num_attention_heads=9, num_key_value_heads=3,
              head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
              max_position_embeddings=8192, hidden_act="silu")


def config(num_layers: int) -> transformer.Config:
  return llama.config_from_hf({**hf_config(num_layers), "architectures": ["LlamaForCausalLM"]})


def decode_case(cfg, params, dtype, batch: int, capacity: int, fill: int):
  """(a timing case of one decode step at `fill`, temp MiB of the compiled step)."""
  step = jax.jit(transformer.step_fn(cfg), donate_argnums=1)
  caches = transformer.init_caches(cfg, batch, capacity, dtype=dtype)
  prompt = jnp.ones((batch, fill), jnp.int32)
  _, filled = step(params, caches, prompt, None)
  token = jnp.ones((batch, 1), jnp.int32)
  compiled = step.lower(params, filled, token, None).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  start_index = np.asarray(filled.index)
  state = {"caches": filled}

  def run():
    logits, state["caches"] = compiled(params, state["caches"], token, None)
    return logits

  def reset():  # Back to `fill` tokens: every timed step sees the same fill.
    c = state["caches"]
    state["caches"] = c._replace(index=jnp.asarray(start_index),
                                 lengths=jnp.full_like(c.lengths, fill),
                                 valid=c.valid.at[:, :, fill:].set(False))

  return timing.Stateful(run, reset), temp


def steps_suite():
  cfg = config(_NUM_LAYERS.value)
  capacities = [int(c) for c in _CAPACITIES.value]
  if _FILL.value + 1 > min(capacities):
    raise app.UsageError(f"--fill={_FILL.value} needs capacities above it: {capacities}")
  cases, temps = {}, {}
  for layout, (name, unstacked) in LAYOUTS.items():
    dtype = jnp.dtype(name)
    params = transformer.init_params(jax.random.key(0), cfg, dtype=dtype)
    if unstacked:
      params = transformer.unstack_layers(params)
    for capacity in capacities:
      key = (layout, capacity)
      cases[key], temps[key] = decode_case(cfg, params, dtype, _BATCH.value, capacity, _FILL.value)
  times = timing.time_interleaved(cases, _ROUNDS.value)
  print(f"\nDecode step, {cfg.num_layers} layers x {cfg.d_model}, B={_BATCH.value}, fill "
        f"{_FILL.value}; min (median) of {_ROUNDS.value} rounds\n")
  print("| params | max_len | decode step ms | vs smallest max_len | speed vs float32 | "
        "temp MiB |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for layout in LAYOUTS:
    base = times[(layout, capacities[0])][1]
    for capacity in capacities:
      median, low = times[(layout, capacity)]
      f32 = times[("float32", capacity)][1]
      print(f"| {layout} | {capacity} | {low:.1f} ({median:.1f}) | {low / base:.2f}x | "
            f"{f32 / low:.2f}x | {temps[(layout, capacity)]:.1f} |")


def prompts(batch: int, longest: int, vocab: int, seed: int = 0):
  """Random prompts [B, P], left-padded (row 0 the longest; transformers wants left padding)."""
  rng = np.random.default_rng(seed)
  lengths = [longest] + list(rng.integers(longest // 2, longest + 1, batch - 1))
  tokens = rng.integers(1, vocab, (batch, longest)).astype(np.int32)
  mask = np.arange(longest)[None] >= longest - np.asarray(lengths)[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


class KvattnGeneration:
  """kvattn: prefill + first token (`start`), then the compiled decode loop (`finish`)."""
  def __init__(self, params, cfg, tokens, mask, new_tokens, unstacked):
    self.params = transformer.unstack_layers(params) if unstacked else params
    self.params = jax.device_put(self.params)
    self.cfg, self.tokens, self.mask = cfg, jnp.asarray(tokens), jnp.asarray(mask)
    self.step_fn = transformer.step_fn(cfg)
    self.kw = dict(max_new_tokens=new_tokens, sampler=sampling.Sampler())
    b, p = tokens.shape
    self.dtype = jax.tree.leaves(self.params)[0].dtype
    self.max_len = p + new_tokens
    caches = self.caches()
    t0 = time.perf_counter()
    self.start = generation.start_donating.lower(self.step_fn, self.params, caches, self.tokens,
                                                 self.mask, jax.random.key(0), **self.kw).compile()
    state = jax.eval_shape(functools.partial(generation.start, self.step_fn, **self.kw),
                           self.params, caches, self.tokens, self.mask, jax.random.key(0))
    self.finish = generation.finish.lower(self.step_fn, self.params, state,
                                          sampler=self.kw["sampler"]).compile()
    self.compile_s = time.perf_counter() - t0

  def caches(self):
    return transformer.init_caches(self.cfg, self.tokens.shape[0], self.max_len, dtype=self.dtype)

  def run(self):
    """(seconds to the first token, seconds for the rest, tokens [B, M])."""
    caches = jax.block_until_ready(self.caches())
    sampler = self.kw["sampler"]
    t0 = time.perf_counter()
    state = jax.block_until_ready(
        self.start(self.params, caches, self.tokens, self.mask, jax.random.key(0), sampler=sampler))
    t1 = time.perf_counter()
    state = jax.block_until_ready(self.finish(self.params, state, sampler=sampler))
    return t1 - t0, time.perf_counter() - t1, np.asarray(state.tokens)


class TransformersGeneration:
  """transformers: `generate` of 1 token (time to first token), then of M tokens."""
  def __init__(self, model, tokens, mask, new_tokens):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.model, self.new_tokens = torch, model, new_tokens
    self.ids = torch.from_numpy(tokens.astype(np.int64))
    self.mask = torch.from_numpy(mask.astype(np.int64))
    self.compile_s = 0.0
    self._generate(1)  # Warm-up.

  def _generate(self, n):
    with self.torch.inference_mode():
      out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, self.ids.shape[1]:].numpy()

  def run(self):
    t0 = time.perf_counter()
    self._generate(1)
    t1 = time.perf_counter()
    tokens = self._generate(self.new_tokens)
    # Decode time: the whole generation less a prefill and first token.
    return t1 - t0, time.perf_counter() - t1 - (t1 - t0), tokens


def generate_suite():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"\ngenerate suite skipped: {e} (pip install torch==2.13.0 transformers)")
    return
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  hf = hf_config(_NUM_LAYERS.value)
  cfg = config(_NUM_LAYERS.value)
  loads = {}
  with tempfile.TemporaryDirectory() as tmp:
    cases = {}
    for name in ("float32", "bfloat16"):
      torch_dtype = getattr(torch, name)
      directory = pathlib.Path(tmp) / name
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).to(torch_dtype)
      model.save_pretrained(directory)
      del model
      np_dtype = np.float32 if name == "float32" else ml_dtypes.bfloat16
      load_times = {"kvattn": [], "transformers": []}
      for _ in range(_ROUNDS.value):
        t0 = time.perf_counter()
        params, _, _ = llama.load(directory, dtype=np_dtype)
        t1 = time.perf_counter()
        model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch_dtype)
        t2 = time.perf_counter()
        load_times["kvattn"].append(t1 - t0)
        load_times["transformers"].append(t2 - t1)
      loads[name] = {lib: min(t) for lib, t in load_times.items()}
      model.eval()
      for batch in (1, 8):
        tokens, mask = prompts(batch, _PROMPT_LEN.value, cfg.vocab_size)
        cases[(name, batch, "kvattn")] = KvattnGeneration(params, cfg, tokens, mask,
                                                          _NEW_TOKENS.value, unstacked=name
                                                          != "float32")
        cases[(name, batch, "transformers")] = TransformersGeneration(model, tokens, mask,
                                                                      _NEW_TOKENS.value)
    results = {key: [] for key in cases}
    for _ in range(_ROUNDS.value):
      for key, case in cases.items():
        results[key].append(case.run())
  print(f"\nGreedy generation, {cfg.num_layers} layers x {cfg.d_model}, prompts up to "
        f"{_PROMPT_LEN.value} tokens (batch 8: ragged, left-padded), {_NEW_TOKENS.value} new "
        f"tokens; min of {_ROUNDS.value} rounds. kvattn's bfloat16 runs unstacked layers.\n")
  print("| dtype, batch | library | load s | compile s | time to first token ms | "
        "decode tokens/s | tokens equal |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for (name, batch, lib), runs in results.items():
    ttft = min(r[0] for r in runs)
    decode = min(r[1] for r in runs)
    rate = batch * (_NEW_TOKENS.value - 1) / decode
    mine = results[(name, batch, "kvattn")][0][2]
    theirs = results[(name, batch, "transformers")][0][2]
    equal = f"{np.mean(mine == theirs):.0%}" if lib == "kvattn" else ""
    print(f"| {name}, {batch} | {lib} | {loads[name][lib]:.2f} | "
          f"{cases[(name, batch, lib)].compile_s:.1f} | {ttft * 1e3:.0f} | {rate:.1f} | "
          f"{equal} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = set(_SUITE.value) - set(SUITES)
  if unknown:
    raise app.UsageError(f"--suite should name some of {SUITES}: but got {sorted(unknown)}")
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax "
        f"{jax.__version__}, {jax.devices()[0].device_kind}")
  if "steps" in _SUITE.value:
    steps_suite()
  if "generate" in _SUITE.value:
    generate_suite()


if __name__ == "__main__":
  app.run(main)
