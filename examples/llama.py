r"""Runs a Hugging Face checkpoint on kvattn: Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3,
OLMo 2 or GPT-2 (`kvattn.models.loaders.FAMILIES`).

A checkpoint directory holds `config.json`, `model.safetensors` (or the shards
of `model.safetensors.index.json`) and, for text prompts, `tokenizer.json`;
`kvattn.models.load` picks the loader that config.json names. Generation
stops at the end-of-sequence ids of config.json and generation_config.json.
Weights are memory-mapped and read with numpy, and text is tokenized with
`tokenizers` (the `[models]` extra; no torch). Nothing is downloaded: point
`--checkpoint` at a local copy, e.g. of https://huggingface.co/Qwen/Qwen2.5-0.5B
or meta-llama/Llama-3.2-1B.

  python examples/llama.py --checkpoint=/path/to/Qwen2.5-0.5B --prompt='The capital of France is'
  python examples/llama.py --checkpoint=/path/to/Llama-3.2-1B --prompt_ids=128000,791 \
      --dtype=bfloat16 --print_ids
  python examples/llama.py --checkpoint=/path/to/Llama-3.2-1B --prompt='Hello' --quantized_cache
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
import ml_dtypes
import numpy as np

from kvattn import sampling
from kvattn.models import loaders
from kvattn.models import runner

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Directory of a Hugging Face checkpoint of a supported family.",
                                  required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (needs tokenizer.json).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt as token ids: 1,2,3.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the nucleus of this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_PRINT_IDS = flags.DEFINE_bool("print_ids", False, "End with a line of the generated ids.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(_DTYPES),
                           "Params and cache dtype (logits and softmax stay float32).")
_QUANTIZED_CACHE = flags.DEFINE_bool("quantized_cache", False,
                                     "Store the cache's k and v as int8 with float32 scales.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    runner.main_for_checkpoint(
        functools.partial(loaders.load, dtype=_DTYPES[_DTYPE.value]), checkpoint=_CHECKPOINT.value,
        prompt=_PROMPT.value, prompt_ids=_PROMPT_IDS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        sampler=sampling.Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value), seed=_SEED.value,
        print_ids=_PRINT_IDS.value, quantized_cache=_QUANTIZED_CACHE.value)
  except runner.UsageError as error:
    raise app.UsageError(str(error)) from error


if __name__ == "__main__":
  app.run(main)
