r"""Runs a GPT-2 checkpoint in the Hugging Face layout on the example transformer.

A checkpoint directory holds `config.json`, `model.safetensors` and, for text
prompts, `tokenizer.json`. Weights are read with the `safetensors` package's
numpy API and text is tokenized with `tokenizers` (the `[gpt2]` extra; no
torch). Nothing is downloaded: point `--checkpoint` at a local copy, e.g. of
https://huggingface.co/openai-community/gpt2.

  python examples/gpt2.py --checkpoint=/path/to/gpt2 --prompt='The meaning of life is'
  python examples/gpt2.py --checkpoint=/path/to/gpt2 --prompt_ids=464,3290 --print_ids
"""

from __future__ import annotations

import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags

from examples import runner
from kvattn.models import gpt2
from kvattn import sampling

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Directory of a GPT-2 checkpoint.",
                                  required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (needs tokenizer.json).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt as token ids: 1,2,3.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the nucleus of this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_PRINT_IDS = flags.DEFINE_bool("print_ids", False, "End with a line of the generated ids.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  params, config, hf = gpt2.load(_CHECKPOINT.value)
  tokenizer = None
  tokenizer_path = pathlib.Path(_CHECKPOINT.value) / "tokenizer.json"
  if tokenizer_path.exists():
    from tokenizers import Tokenizer  # The [gpt2] extra.
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
  if _PROMPT.value is not None:
    if tokenizer is None:
      raise app.UsageError(f"--prompt needs {tokenizer_path}; or pass --prompt_ids")
    prompt_ids = tokenizer.encode(_PROMPT.value).ids
  else:
    prompt_ids = [int(i) for i in _PROMPT_IDS.value]
  if not prompt_ids:
    raise app.UsageError("the prompt is empty")
  sampler = sampling.Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  ids, timing = runner.generate_ids(
      params, config, prompt_ids, max_new_tokens=_MAX_NEW_TOKENS.value, sampler=sampler,
      seed=_SEED.value, eos_id=hf.get("eos_token_id"))
  if tokenizer is not None:
    print(tokenizer.decode(prompt_ids) + tokenizer.decode(ids.tolist()))
  print(timing.line(1, len(prompt_ids)))
  if _PRINT_IDS.value:
    print(" ".join(str(i) for i in ids))


if __name__ == "__main__":
  app.run(main)
