"""Hugging Face checkpoint directories: `config.json` and safetensors weights, read with numpy.

A directory holds `config.json` and either one `model.safetensors` or shards
listed in `model.safetensors.index.json` (its `weight_map`: tensor name ->
file). Tensors are read with the `safetensors` package's numpy API (the
`[models]` extra; no torch). bfloat16 tensors come back as numpy arrays of
`ml_dtypes.bfloat16`, the dtype jax registers with numpy.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterable

import ml_dtypes  # noqa: F401  (gives numpy the name "bfloat16" that safetensors asks for)
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
  """The parsed `config.json` of a checkpoint directory."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint should have a config.json: but {path} does not exist")
  return json.loads(path.read_text())


def read_tensors(directory: str | pathlib.Path,
                 keep: Callable[[str], bool] = lambda name: True) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint whose name passes `keep`, as numpy arrays, by name.

  Reads `model.safetensors`, or each shard named in
  `model.safetensors.index.json` once.
  """
  from safetensors import safe_open  # The [models] extra.
  directory = pathlib.Path(directory)
  files = _weight_files(directory)
  tensors = {}
  for file in files:
    with safe_open(str(directory / file), framework="numpy") as f:
      for name in f.keys():
        if keep(name):
          tensors[name] = f.get_tensor(name)
  return tensors


def _weight_files(directory: pathlib.Path) -> list[str]:
  if (directory / INDEX_FILE).is_file():
    index = json.loads((directory / INDEX_FILE).read_text())
    files = sorted(set(index.get("weight_map", {}).values()))
    missing = [f for f in files if not (directory / f).is_file()]
    if not files or missing:
      raise FileNotFoundError(
          f"{directory / INDEX_FILE} should list shards that exist: but got {files}, "
          f"missing {missing}")
    return files
  if (directory / SINGLE_FILE).is_file():
    return [SINGLE_FILE]
  raise FileNotFoundError(
      f"checkpoint should have {SINGLE_FILE} or {INDEX_FILE}: but {directory} has neither")


class Tensors:
  """Named tensors with checked access: `take(name, shape)` or a clear ValueError."""

  def __init__(self, tensors: dict[str, np.ndarray], dtype, source: str):
    self._tensors = tensors
    self._dtype = dtype
    self._source = source

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, which must have `shape`, in the loader's dtype."""
    if name not in self._tensors:
      raise ValueError(f"{self._source} has no tensor {name!r}")
    a = self._tensors[name]
    if tuple(a.shape) != tuple(shape):
      raise ValueError(f"{name} shape should be {tuple(shape)}: but got {tuple(a.shape)}")
    return np.asarray(a).astype(self._dtype, copy=False)


def tree_stack(trees: Iterable[Any]) -> Any:
  """Stacks a list of equal nested dicts of arrays along a new leading axis."""
  trees = list(trees)
  if isinstance(trees[0], dict):
    return {k: tree_stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def read_tokenizer(directory: str | pathlib.Path):
  """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`, or None if it has none."""
  path = pathlib.Path(directory) / "tokenizer.json"
  if not path.is_file():
    return None
  from tokenizers import Tokenizer  # The [models] extra.
  return Tokenizer.from_file(str(path))


def eos_ids(hf: dict[str, Any]) -> list[int]:
  """The end-of-sequence ids of a `config.json` (`eos_token_id`: an int, a list, or absent)."""
  eos = hf.get("eos_token_id")
  if eos is None:
    return []
  return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
