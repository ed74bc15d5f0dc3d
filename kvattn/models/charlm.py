"""The character-level LM: vocabulary, checkpoint, text generation.

A checkpoint is one `.npz` file, readable without pickle: the params as
float arrays named by their path ("layers/attn/wq"), plus two JSON strings,
`config` (the `transformer.Config`) and `vocab` (the characters, in id order).

Shape legend:
  B: batch size (number of prompts)
  T: number of characters
  M: max_new_tokens
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from kvattn import rope
from kvattn import sampling
from kvattn.models import runner
from kvattn.models import transformer

DEFAULT_CHECKPOINT = pathlib.Path(__file__).absolute().parent / "data" / "charlm.npz"

# Id 0 is padding; characters outside the vocabulary also map to it.
PAD_ID = 0
_PAD_CHAR = "\x00"


class Vocab:
  """Characters <-> ids. Id 0 is padding and stands for unknown characters."""
  def __init__(self, chars: Sequence[str]):
    if not chars or chars[0] != _PAD_CHAR:
      raise ValueError("chars[0] should be the padding character '\\x00'")
    self.chars = list(chars)
    self._ids = {c: i for i, c in enumerate(self.chars)}

  @classmethod
  def from_text(cls, text: str, min_count: int = 1) -> Vocab:
    """Every character seen at least `min_count` times in `text`, sorted."""
    chars, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32),
                              return_counts=True)
    kept = sorted(chr(c) for c, n in zip(chars, counts) if n >= min_count and chr(c) != _PAD_CHAR)
    return cls([_PAD_CHAR] + kept)

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """int32 `[T]` ids."""
    return np.array([self._ids.get(c, PAD_ID) for c in text], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[i] for i in ids if i != PAD_ID)


def encode_batch(vocab: Vocab, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Returns right-padded ids int32 `[B, T]` and mask bool `[B, T]` (T: longest text)."""
  ids = [vocab.encode(t) for t in texts]
  width = max(len(i) for i in ids)
  tokens = np.full((len(ids), width), PAD_ID, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for b, row in enumerate(ids):
    tokens[b, :len(row)] = row
    mask[b, :len(row)] = True
  return tokens, mask


def save(path: str | pathlib.Path, params: transformer.Params, config: transformer.Config,
         vocab: Vocab, dtype=np.float16) -> None:
  """Writes the checkpoint; weights are stored as `dtype` (float16 halves the file)."""
  arrays = {name: np.asarray(a, dtype) for name, a in _flatten(params).items()}
  arrays["config"] = np.array(json.dumps(config._asdict()))
  arrays["vocab"] = np.array(json.dumps(vocab.chars))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)


def load(
    path: str | pathlib.Path = DEFAULT_CHECKPOINT
) -> tuple[transformer.Params, transformer.Config, Vocab]:
  """Reads a checkpoint written by `save`; params come back as float32 numpy arrays."""
  with np.load(path, allow_pickle=False) as f:
    config = _config_from_json(json.loads(str(f["config"])))
    vocab = Vocab(json.loads(str(f["vocab"])))
    flat = {name: f[name].astype(np.float32) for name in f.files if name not in ("config", "vocab")}
  return _unflatten(flat), config, vocab


def _config_from_json(fields: dict[str, Any]) -> transformer.Config:
  """The Config that `save` wrote: JSON turned its tuples (and NamedTuples) into lists."""
  if fields.get("rope_scaling") is not None:
    # JSON turned the factor lists (longrope) into lists; Scaling keeps tuples (hashable).
    fields["rope_scaling"] = rope.Scaling(
        *(tuple(f) if isinstance(f, list) else f for f in fields["rope_scaling"]))
  if "window_pattern" in fields:
    fields["window_pattern"] = tuple(fields["window_pattern"])
  # Older versions had a `sliding_window` field (W for every layer, or None), set only with an
  # empty `window_pattern`; it is `window_pattern=(W,)` now.
  window = fields.pop("sliding_window", None)
  if window is not None:
    if fields.get("window_pattern"):
      raise ValueError(f"config should set one of sliding_window and window_pattern: but got "
                       f"{window} and {fields['window_pattern']}")
    fields["window_pattern"] = (window,)
  return transformer.Config(**fields)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{name}/"))
    else:
      out[prefix + name] = value
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def generate_text(
    params: transformer.Params, config: transformer.Config, vocab: Vocab, prompts: Sequence[str], *,
    max_new_tokens: int, sampler: sampling.Sampler, seed: int = 0, prefill_mode: str = "one_pass",
    chunk_size: int | None = None, on_token: Callable[[np.ndarray], None] | None = None,
    quantized_cache: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, runner.Timing]:
  """Continues each prompt with the char-LM, the prompts as one ragged batch.

  `runner.run` does the work (see there for `on_token`, the streaming mode).
  `quantized_cache` stores the caches' k and v as int8 with float32 scales.

  Returns:
    `(texts, tokens [B, M], lengths [B], timing)`: the continuations only.
  """
  tokens, mask = encode_batch(vocab, prompts)
  if not mask.any(axis=1).all():
    raise ValueError("every prompt needs at least one character")
  caches = transformer.init_caches(config, len(prompts), tokens.shape[1] + max_new_tokens - 1,
                                   quantized=quantized_cache)
  out, lengths, timing = runner.run(transformer.step_fn(config), params, caches, tokens, mask,
                                    max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                    prefill_mode=prefill_mode, chunk_size=chunk_size,
                                    on_token=on_token)
  texts = [vocab.decode(row[:n]) for row, n in zip(out, lengths)]
  return texts, out, lengths, timing
