r"""Generates text with the bundled character-level model (or any char-LM checkpoint).

  python examples/generate.py
  python examples/generate.py --prompt='def parse(' --prompt='import ' --temperature=0
  python examples/generate.py --stream --max_new_tokens=300
  python examples/generate.py --checkpoint=charlm.npz  # One that train_charlm.py wrote.

Several `--prompt`s of different lengths run as one ragged batch. The timing
line gives compile time, prefill time and decode speed separately.

Shape legend:
  B: batch size (number of prompts)
  P: padded prompt length
  N: max_new_tokens
"""

from __future__ import annotations

import functools
import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
from kvattn.models import charlm
from kvattn import generation
from kvattn import sampling

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

DEFAULT_PROMPTS = ("import ", "class Stack:\n    def push(self, item):\n        ",
                   "    def __init__(self, ")

_PROMPT = flags.DEFINE_multi_string("prompt", list(DEFAULT_PROMPTS),
                                    "A prompt; repeat the flag for a ragged batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 120, "Characters to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely characters.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the nucleus of this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_PREFILL_MODE = flags.DEFINE_enum("prefill_mode", "one_pass", list(generation.PREFILL_MODES),
                                  "How the prompts enter the cache.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 8, "Tokens per call with --prefill_mode=chunked.")
_STREAM = flags.DEFINE_bool("stream", False, "Print the first prompt's text as it is generated.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", str(charlm.DEFAULT_CHECKPOINT),
    "A char-LM .npz written by train_charlm.py; by default the bundled one.")
_QUANTIZED_CACHE = flags.DEFINE_bool("quantized_cache", False,
                                     "Store the cache's k and v as int8 with float32 scales.")
_PRINT_IDS = flags.DEFINE_bool("print_ids", False,
                               "End with a line of the first prompt's generated token ids.")


def _print_first_row(vocab, column):
  print(vocab.decode(column[:1]), end="", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MAX_NEW_TOKENS.value < 1:
    raise app.UsageError(f"--max_new_tokens should be at least 1: but got {_MAX_NEW_TOKENS.value}")
  if not pathlib.Path(_CHECKPOINT.value).is_file():
    raise app.UsageError(f"--checkpoint should be a char-LM .npz file: but {_CHECKPOINT.value} "
                         "does not exist")
  params, config, vocab = charlm.load(_CHECKPOINT.value)
  params = jax.device_put(params)  # Once, not at every call (this also starts JAX up).
  prompts = _PROMPT.value
  if not all(prompts):
    raise app.UsageError(f"--prompt should not be empty: but got {prompts!r}")
  try:
    sampler = sampling.Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:  # The message names the setting: --temperature, --top_k, --top_p.
    raise app.UsageError(f"--{e}") from None
  on_token = None
  if _STREAM.value:
    print(f"--- prompt 1 (streaming)\n{prompts[0]}", end="", flush=True)
    on_token = functools.partial(_print_first_row, vocab)
  texts, tokens, lengths, timing = charlm.generate_text(
      params, config, vocab, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, sampler=sampler,
      seed=_SEED.value, prefill_mode=_PREFILL_MODE.value, chunk_size=_CHUNK_SIZE.value,
      on_token=on_token, quantized_cache=_QUANTIZED_CACHE.value)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    if _STREAM.value and i == 0:
      print()
      continue
    print(f"--- prompt {i + 1}\n{prompt}{text}")
  print("---")
  print(timing.line(len(prompts), max(len(p) for p in prompts)))
  if _PRINT_IDS.value:
    print(" ".join(str(t) for t in tokens[0, :lengths[0]]))


if __name__ == "__main__":
  app.run(main)
