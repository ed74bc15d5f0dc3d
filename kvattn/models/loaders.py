"""Any supported Hugging Face checkpoint: `load(directory)` picks its loader from `config.json`.

`FAMILIES` has one row per loader module: the `model_type`s it takes (each
with the model class that `architectures` names) and its `load`. A new
family (Qwen3, Gemma, Phi-3, OLMo 2) is a module with `MODEL_TYPES` and
`load(directory, dtype)` returning `(params, config, hf_config)`, and a row
here.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from kvattn.models import checkpoint
from kvattn.models import gemma
from kvattn.models import gpt2
from kvattn.models import llama
from kvattn.models import phi3
from kvattn.models import transformer


class Family(NamedTuple):
  """One loader: the config.json names it takes and its `load(directory, dtype)`."""

  name: str
  model_types: Mapping[str, str]  # config.json's model_type -> its architectures class.
  load: Callable[..., tuple[transformer.Params, transformer.Config, dict[str, Any]]]


FAMILIES = (
    Family("llama", llama.MODEL_TYPES, llama.load),  # Llama, Mistral, Qwen2 and 3, OLMo 2.
    Family("phi3", phi3.MODEL_TYPES, phi3.load),
    Family("gpt2", gpt2.MODEL_TYPES, gpt2.load),
    Family("gemma", gemma.MODEL_TYPES, gemma.load),  # Gemma, Gemma 2, Gemma 3 text.
)


def family(hf: dict[str, Any]) -> Family:
  """The row of `FAMILIES` that takes this `config.json`, or a ValueError naming what it holds.

  `architectures` decides, then `model_type` (see `checkpoint.architecture`).
  """
  model_types = {t: c for row in FAMILIES for t, c in row.model_types.items()}
  name = checkpoint.architecture(hf, model_types, "kvattn.models.load")
  return next(row for row in FAMILIES if name in row.model_types.values())


def load(directory: str | pathlib.Path,
         dtype=np.float32) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """Reads a checkpoint directory with the loader its `config.json` names.

  Args:
    directory: holds `config.json` and `model.safetensors` or the shards of
      `model.safetensors.index.json`.
    dtype: the params' numpy dtype (np.float32, or ml_dtypes.bfloat16).

  Returns:
    `(numpy params, config, hf_config)`, as the family's own `load`.
  """
  return family(checkpoint.read_config(directory)).load(directory, dtype=dtype)
