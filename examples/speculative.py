r"""Speculative decoding with the bundled character-level model drafting for itself.

  python examples/speculative.py
  python examples/speculative.py --prompt='def parse(' --num_draft=2 --max_new_tokens=200

The target is the bundled char-LM; the draft is its first --draft_layers
layers with the same embedding and final norm (no training: a cheap, rough
guess of the full model). Prints the text, the draft's acceptance rate, the
speed of speculative and plain greedy decoding (each timed after a warm-up
compilation, best of --repeats), and whether the tokens equal plain greedy
decoding with the target alone (they must).

Shape legend:
  B: batch size (1 here)
  P: prompt length
  M: max_new_tokens
"""

from __future__ import annotations

import logging
import pathlib
import sys
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import numpy as np
from kvattn.models import charlm
from kvattn.models import transformer
from kvattn import generation
from kvattn import sampling
from kvattn import speculative

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_PROMPT = flags.DEFINE_string("prompt", "class Stack:\n    def push(self, item):\n        ",
                              "The prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 120, "Characters to generate.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 3, "Draft tokens proposed per round (k).")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 1,
                                     "Layers of the target that make up the draft.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each decoder; the best counts.")


def _best_time(run, repeats):
  """(result, best seconds) of `repeats` calls of `run`, after one untimed warm-up call."""
  out = jax.block_until_ready(run())
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    best = min(best, time.perf_counter() - t0)
  return out, best


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params, config, vocab = charlm.load()
  params = jax.device_put(params)  # Once, not at every call (this also starts JAX up).
  if not 1 <= _DRAFT_LAYERS.value <= config.num_layers:
    raise app.UsageError(f"--draft_layers should be in [1, {config.num_layers}]: "
                         f"but got {_DRAFT_LAYERS.value}")
  draft_config = config._replace(num_layers=_DRAFT_LAYERS.value)
  draft_params = dict(params, layers=jax.tree.map(lambda a: a[:_DRAFT_LAYERS.value],
                                                  params["layers"]))
  tokens, mask = charlm.encode_batch(vocab, [_PROMPT.value])
  m, k = _MAX_NEW_TOKENS.value, _NUM_DRAFT.value
  max_len = speculative.required_max_len(1, tokens.shape[1], m, k)

  def run_speculative():
    return speculative.speculative_generate(transformer.step_fn(config), params,
                                            transformer.init_caches(config, 1, max_len),
                                            transformer.step_fn(draft_config), draft_params,
                                            transformer.init_caches(draft_config, 1, max_len),
                                            tokens, mask, max_new_tokens=m, num_draft=k)

  def run_target():
    return generation.generate(transformer.step_fn(config), params,
                               transformer.init_caches(config, 1,
                                                       max_len), tokens, mask, max_new_tokens=m,
                               sampler=sampling.Sampler(), key=jax.random.key(0)).tokens

  (spec_tokens, stats), spec_s = _best_time(run_speculative, _REPEATS.value)
  target_tokens, target_s = _best_time(run_target, _REPEATS.value)
  spec_tokens, target_tokens = np.asarray(spec_tokens), np.asarray(target_tokens)
  print(_PROMPT.value + vocab.decode(spec_tokens[0]))
  print("---")
  print(f"draft: {_DRAFT_LAYERS.value} of {config.num_layers} layers, k = {k} | "
        f"rounds {int(stats.rounds)} | accepted {int(stats.accepted)} of {int(stats.drafted)} "
        f"drafts: acceptance rate {stats.acceptance_rate:.2f}")
  print(f"speculative: {m / spec_s:.0f} tokens/s | target alone: {m / target_s:.0f} tokens/s | "
        f"speed-up {target_s / spec_s:.2f}x")
  print(f"identical to the target alone: {bool(np.array_equal(spec_tokens, target_tokens))}")


if __name__ == "__main__":
  app.run(main)
