r"""Serves a model over an OpenAI-compatible HTTP API (`kvattn.serving.openai_api`).

By default the bundled character-level model; `--checkpoint` serves a
Hugging Face checkpoint of a supported family (`kvattn.models.loaders`),
with its tokenizer.json, its end-of-sequence ids and the chat template of
its tokenizer_config.json (or chat_template.jinja). Needs the `serve` extra
(FastAPI, uvicorn, jinja2).

  python examples/serve.py --port=8000
  python examples/serve.py --checkpoint=/path/to/Qwen2.5-0.5B-Instruct --dtype=bfloat16 \
      --max_seqs=16 --max_len=2048

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"model": "charlm", "prompt": "def ", "max_tokens": 40, "temperature": 0}'

or with the `openai` client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`.
"""

from __future__ import annotations

import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import ml_dtypes
import numpy as np

import uvicorn

from kvattn import serving
from kvattn.models import charlm
from kvattn.models import checkpoint
from kvattn.models import loaders
from kvattn.models import runner
from kvattn.serving import async_engine as async_engine_lib
from kvattn.serving import openai_api
from kvattn.serving import text

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Directory of a Hugging Face checkpoint; by default the bundled charlm.")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "The model id clients name; by default the checkpoint's directory name.")
_MAX_SEQS = flags.DEFINE_integer("max_seqs", 8, "Sequences that run at once.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Most tokens of one sequence, prompt and output.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per cache page.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", None,
                                  "Pages in the pool; by default max_seqs * max_len / page_size.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 128, "Most tokens one step runs.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(_DTYPES),
                           "Params and cache dtype of a --checkpoint (logits stay float32).")


def load_model(directory: str | None, dtype):
  """(params, config, tokenizer, eos ids, chat template, default name) of the model to serve."""
  if directory is None:
    params, config, vocab = charlm.load()
    return params, config, text.CharTokenizer(vocab), (), None, "charlm"
  if not pathlib.Path(directory, "config.json").is_file():
    raise runner.UsageError(f"--checkpoint should be a checkpoint directory: {directory} has no "
                            "config.json")
  tokenizer = checkpoint.read_tokenizer(directory)
  if tokenizer is None:
    raise runner.UsageError(f"--checkpoint needs {directory}/tokenizer.json to serve text")
  params, config, hf = loaders.load(directory, dtype=dtype)
  eos = checkpoint.eos_ids(hf, checkpoint.read_generation_config(directory))
  template = text.ChatTemplate.from_checkpoint(directory)
  return (params, config, text.HFTokenizer(tokenizer), eos, template,
          pathlib.Path(directory).absolute().name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    params, config, tokenizer, eos, template, name = load_model(_CHECKPOINT.value,
                                                                _DTYPES[_DTYPE.value])
    engine_config = serving.EngineConfig(max_seqs=_MAX_SEQS.value, max_len=_MAX_LEN.value,
                                         page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                                         token_budget=_TOKEN_BUDGET.value)
    try:
      engine = serving.Engine(params, config, engine_config, eos_token_ids=eos)
    except ValueError as e:  # The message names a size (engine_config.max_len, ...) or the model.
      message = str(e)
      flag = message.startswith("engine_config.")
      raise runner.UsageError(f"--{message.removeprefix('engine_config.')}"
                              if flag else f"--checkpoint: {message}") from None
  except runner.UsageError as error:
    raise app.UsageError(str(error)) from error
  async_engine = async_engine_lib.AsyncEngine(engine)
  api = openai_api.build_app(async_engine, tokenizer, _MODEL_NAME.value or name, template)
  with async_engine:
    uvicorn.run(api, host=_HOST.value, port=_PORT.value)


if __name__ == "__main__":
  app.run(main)
