"""Hugging Face checkpoint directories: `config.json` and safetensors weights, read with numpy.

A directory holds `config.json` and either one `model.safetensors` or shards
listed in `model.safetensors.index.json` (its `weight_map`: tensor name ->
file). The safetensors files are memory-mapped and their tensors read as
numpy views of the mapping (no copy, no torch; the format is an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the
bytes). bfloat16 tensors are views of `ml_dtypes.bfloat16`, the dtype jax
registers with numpy. The loaders then copy each tensor once, into its place
in the params (transposed, stacked over layers, cast to the dtype asked for):
one copy of the weights in memory, besides the file's pages.

`generation_config.json`, when present, adds end-of-sequence ids
(`eos_ids`); `architecture` reads which model class a config.json names.
"""

from __future__ import annotations

import json
import mmap
import pathlib
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

# safetensors dtype names -> numpy dtypes.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_
}


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
  """The parsed `config.json` of a checkpoint directory."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint should have a config.json: but {path} does not exist")
  return json.loads(path.read_text())


def read_tensors(directory: str | pathlib.Path,
                 keep: Callable[[str], bool] = lambda name: True) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint whose name passes `keep`, by name: read-only numpy views.

  Maps `model.safetensors`, or each shard named in
  `model.safetensors.index.json`, into memory once; the arrays are views of
  the mapping (pages are read when a tensor is first touched).
  """
  directory = pathlib.Path(directory)
  tensors = {}
  for file in _weight_files(directory):
    tensors.update(_map_safetensors(directory / file, keep))
  return tensors


def _map_safetensors(path: pathlib.Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file as views of a read-only memory map."""
  with open(path, "rb") as f:
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  size = len(buffer)
  header_size = int.from_bytes(buffer[:8], "little") if size >= 8 else -1
  if not 0 < header_size <= size - 8:
    raise ValueError(f"{path} is not a safetensors file: header size {header_size}, "
                     f"file size {size}")
  header = json.loads(bytes(buffer[8:8 + header_size]))
  start = 8 + header_size
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__" or not keep(name):
      continue
    if info.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} dtype should be one of {sorted(_DTYPES)}: "
                       f"but got {info.get('dtype')!r}")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize or start + end > size:
      raise ValueError(f"{path}: tensor {name} of shape {shape} and dtype {dtype} should "
                       f"take {int(np.prod(shape)) * dtype.itemsize} bytes within the file: "
                       f"but got offsets {begin}..{end}")
    tensors[name] = np.frombuffer(buffer, dtype, int(np.prod(shape)), start + begin).reshape(shape)
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
  """Named tensors with checked access: `take(name, shape)` or a clear ValueError.

  `dtype` is the loader's: `take` returns views in the stored dtype, and
  `own` and `tree_stack` make the one copy in it.
  """
  def __init__(self, tensors: dict[str, np.ndarray], dtype, source: str):
    self._tensors = tensors
    self.dtype = dtype
    self._source = source

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, which must have `shape`: a view, in the stored dtype."""
    if name not in self._tensors:
      raise ValueError(f"{self._source} has no tensor {name!r}")
    a = self._tensors[name]
    if tuple(a.shape) != tuple(shape):
      raise ValueError(f"{name} shape should be {tuple(shape)}: but got {tuple(a.shape)}")
    return a

  def own(self, a: np.ndarray) -> np.ndarray:
    """A writable copy of a (view of a) tensor in the loader's dtype: the one copy."""
    return np.array(a, dtype=self.dtype, order="C")


def tree_stack(trees: Iterable[Any], dtype=None) -> Any:
  """Stacks a list of equal nested dicts of arrays along a new leading axis, in `dtype`.

  Each array is copied once, straight into its slice of the stacked array
  (cast, and laid out contiguously, on the way), whatever views it was.
  None: the first array's dtype.
  """
  trees = list(trees)
  if isinstance(trees[0], dict):
    return {k: tree_stack([t[k] for t in trees], dtype) for k in trees[0]}
  first = trees[0]
  out = np.empty((len(trees),) + first.shape, first.dtype if dtype is None else dtype)
  for i, a in enumerate(trees):
    out[i] = a
  return out


def read_tokenizer(directory: str | pathlib.Path):
  """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`, or None if it has none."""
  path = pathlib.Path(directory) / "tokenizer.json"
  if not path.is_file():
    return None
  from tokenizers import Tokenizer  # The [models] extra.
  return Tokenizer.from_file(str(path))


def read_generation_config(directory: str | pathlib.Path) -> dict[str, Any]:
  """The parsed `generation_config.json` of a checkpoint directory; {} if it has none."""
  path = pathlib.Path(directory) / GENERATION_CONFIG
  return json.loads(path.read_text()) if path.is_file() else {}


def eos_ids(hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> list[int]:
  """The end-of-sequence ids of a checkpoint: those of `generation_config.json` and `config.json`.

  Each file's `eos_token_id` is an int, a list or absent. Instruct checkpoints
  list their end-of-turn ids (Llama 3's <|eot_id|>, Qwen2's <|im_end|>) in
  generation_config.json only, which transformers' `generate` reads: without
  them generation would run past the end of the answer. The union is taken,
  generation_config.json's first, so that neither file's ids are missed.
  """
  ids = []
  for source in (generation_config or {}, hf):
    eos = source.get("eos_token_id")
    if eos is not None:
      ids.extend(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
  return list(dict.fromkeys(ids))


def architecture(hf: dict[str, Any], model_types: Mapping[str, str], loader: str) -> str:
  """The model class of a `config.json` among those a loader takes, or a ValueError.

  Args:
    hf: the parsed config.json.
    model_types: what the loader takes, `model_type` -> model class
      ({"llama": "LlamaForCausalLM", ...}).
    loader: the loader's name, for the error ("gpt2.load").

  The first class of `architectures` that the loader takes wins; a config
  naming none of them (or without `architectures`, as some older or
  hand-written ones) is read by its `model_type`, as transformers' Auto
  classes do.
  """
  classes = list(hf.get("architectures") or [])
  for name in classes:
    if name in model_types.values():
      return name
  model_type = hf.get("model_type")
  if model_type in model_types:
    return model_types[model_type]
  hint = "" if loader == "kvattn.models.load" else (
      "; kvattn.models.load(directory) picks the loader that config.json names")
  raise ValueError(f"config.json: {loader} takes architectures {sorted(set(model_types.values()))} "
                   f"(model_type {sorted(model_types)}): but got architectures {classes} and "
                   f"model_type {model_type!r}{hint}")
