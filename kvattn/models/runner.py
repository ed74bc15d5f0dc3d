"""Runs `kvattn.generation` on a model and times its stages apart.

The examples' driver (generate.py, gpt2.py, llama.py): compile time, prefill
time and decode speed are measured separately, and a streaming mode hands
each new column to a callback.

Shape legend:
  B: batch size
  P: padded prompt length
  M: max_new_tokens
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from kvattn import generation
from kvattn import sampling
from kvattn.models import checkpoint as model_checkpoint
from kvattn.models import transformer


class UsageError(ValueError):
  """A command-line mistake, named as the flag: the examples show it as a usage error."""


class Timing(NamedTuple):
  """Wall-clock seconds of one generation, compile time apart."""

  compile_s: float
  prefill_s: float
  decode_s: float
  decode_tokens: int  # Real tokens drawn by decode steps, all rows together.

  def line(self, batch: int, prompt_len: int) -> str:
    rate = self.decode_tokens / max(self.decode_s, 1e-9)
    return (f"prefill {batch} x {prompt_len} tokens: {self.prefill_s * 1e3:.1f} ms | "
            f"decode {self.decode_tokens} tokens: {rate:.0f} tokens/s | "
            f"compile {self.compile_s:.2f} s")


def run(
    step_fn: Callable, params: Any, caches: Any, tokens: np.ndarray, mask: np.ndarray, *,
    max_new_tokens: int, sampler: sampling.Sampler, seed: int = 0,
    eos_id: int | list[int] | None = None, pad_id: int = 0, prefill_mode: str = "one_pass",
    chunk_size: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray, Timing]:
  """Generates for prompts `tokens [B, P]` (mask `[B, P]`) and times the stages.

  Without `on_token` the decode loop is the compiled `lax.while_loop`; its two
  stages are compiled ahead of time, so compile time is measured apart. With
  `on_token`, `kvattn.generate_stream` runs and each column (int `[B]`) is
  passed to `on_token` as it is drawn; compile time is then a warm-up of the
  prefill and one decode step.

  Returns:
    `(tokens [B, M], lengths [B], Timing)`, numpy.
  """
  key = jax.random.key(seed)
  # The keyword arguments of generation.generate and generate_stream, so that
  # their compilations are shared with these.
  traced_kw = dict(sampler=sampler, eos_id=eos_id, pad_id=pad_id)
  loop_kw = traced_kw
  start_kw = dict(max_new_tokens=max_new_tokens, prefill_mode=prefill_mode, chunk_size=chunk_size,
                  **loop_kw)
  t0 = time.perf_counter()
  if on_token is None:
    # The sampler, eos_id and pad_id are traced: the compiled stages take them again.
    start = generation.start.lower(step_fn, params, caches, tokens, mask, key, **start_kw).compile()
    state_shape = jax.eval_shape(functools.partial(generation.start, step_fn, **start_kw), params,
                                 caches, tokens, mask, key)
    finish = generation.finish.lower(step_fn, params, state_shape, **loop_kw).compile()
    t1 = time.perf_counter()
    state = jax.block_until_ready(start(params, caches, tokens, mask, key, **traced_kw))
    t2 = time.perf_counter()
    state = jax.block_until_ready(finish(params, state, **traced_kw))
    t3 = time.perf_counter()
    out, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
  else:
    warm = generation.start(step_fn, params, caches, tokens, mask, key, **start_kw)
    jax.block_until_ready(generation.advance(step_fn, params, warm, **loop_kw))
    t1 = time.perf_counter()
    # prompt_buckets=None: the prompt the warm-up above compiled for.
    stream = generation.generate_stream(step_fn, params, caches, tokens, mask, key=key,
                                        prompt_buckets=None, **start_kw)
    columns = [np.asarray(next(stream))]
    on_token(columns[0])
    t2 = time.perf_counter()
    for column in stream:
      columns.append(np.asarray(column))
      on_token(columns[-1])
    t3 = time.perf_counter()
    out = np.full((tokens.shape[0], max_new_tokens), pad_id, np.int32)
    out[:, :len(columns)] = np.stack(columns, axis=1)
    lengths = _lengths(out, len(columns), eos_id)
  timing = Timing(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=t3 - t2,
                  decode_tokens=int(np.sum(np.maximum(lengths - 1, 0))))
  return out, lengths, timing


def _lengths(tokens: np.ndarray, steps: int, eos_id) -> np.ndarray:
  """Per-row lengths of streamed columns: up to and including the first EOS."""
  if eos_id is None:
    return np.full((tokens.shape[0],), steps, np.int32)
  is_eos = np.isin(tokens[:, :steps], np.asarray(eos_id).reshape(-1))
  first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, steps)
  return first.astype(np.int32)


def generate_ids(params: transformer.Params, config: transformer.Config, prompt_ids: list[int], *,
                 max_new_tokens: int, sampler: sampling.Sampler, seed: int = 0,
                 eos_id: int | list[int] | None = None,
                 quantized_cache: bool = False) -> tuple[np.ndarray, Timing]:
  """Continues one prompt; returns the new ids (up to and including EOS) and timing.

  The caches hold k and v in the params' dtype, or with `quantized_cache` as
  int8 with float32 scales (`transformer.init_caches(..., quantized=True)`).
  """
  problem = _length_problem(config, len(prompt_ids), max_new_tokens)
  if problem:
    raise ValueError(problem)
  tokens = np.asarray([prompt_ids], np.int32)
  mask = np.ones(tokens.shape, bool)
  # Quantized caches dequantise to float32, the only dtype they take.
  dtype = jax.numpy.float32 if quantized_cache else jax.numpy.dtype(params["embed"].dtype)
  caches = transformer.init_caches(config, 1, tokens.shape[1] + max_new_tokens - 1, dtype=dtype,
                                   quantized=quantized_cache)
  out, lengths, timing = run(transformer.step_fn(config), params, caches, tokens, mask,
                             max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                             eos_id=eos_id)
  return out[0, :lengths[0]], timing


def _length_problem(config: transformer.Config, prompt_len: int, max_new_tokens: int) -> str | None:
  """Why a prompt and max_new_tokens do not fit the model's learned positions; None if they do."""
  if config.max_positions and prompt_len + max_new_tokens - 1 > config.max_positions:
    return (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) - 1 should fit "
            f"the model's {config.max_positions} positions")
  return None


def main_for_checkpoint(load: Callable[[str], tuple[Any, transformer.Config, dict]], *,
                        checkpoint: str, prompt: str | None, prompt_ids: list[str] | None,
                        max_new_tokens: int, sampler: sampling.Sampler, seed: int, print_ids: bool,
                        quantized_cache: bool = False) -> None:
  """The body of the checkpoint examples' mains (gpt2.py, llama.py): load, generate, print.

  Prints the prompt and its continuation decoded together (with a
  tokenizer.json), a timing line, and with `print_ids` a last line of the
  generated ids, space separated. Generation stops at the end-of-sequence ids
  of config.json and generation_config.json. The flags' mistakes (named as
  the flags `--checkpoint`, `--prompt`, `--prompt_ids`, `--max_new_tokens`)
  raise `UsageError`, which the examples turn into absl's `app.UsageError`
  (absl is the examples' dependency, not the library's).
  """
  if (prompt is None) == (prompt_ids is None):
    raise UsageError("give exactly one of --prompt and --prompt_ids")
  if max_new_tokens < 1:
    raise UsageError(f"--max_new_tokens should be at least 1: but got {max_new_tokens}")
  if prompt_ids is not None:
    ids_in = _parse_ids(prompt_ids)
    if not ids_in:
      raise UsageError("--prompt_ids is empty")
  if not (pathlib.Path(checkpoint) / "config.json").is_file():
    raise UsageError(f"--checkpoint should be a checkpoint directory with a config.json: "
                     f"but {pathlib.Path(checkpoint) / 'config.json'} does not exist")
  try:
    params, config, hf = load(checkpoint)
  except (ValueError, FileNotFoundError) as error:  # What the loader refuses, and why.
    raise UsageError(f"--checkpoint={checkpoint}: {error}") from error
  params = jax.device_put(params)  # Once, not as part of the timed prefill.
  tokenizer = model_checkpoint.read_tokenizer(checkpoint)
  if prompt is not None:
    if tokenizer is None:
      raise UsageError(f"--prompt needs {checkpoint}/tokenizer.json; or pass --prompt_ids")
    ids_in = tokenizer.encode(prompt).ids
    if not ids_in:
      raise UsageError(f"--prompt={prompt!r} encodes to no tokens")
  outside = [i for i in ids_in if not 0 <= i < config.vocab_size]
  if outside:
    source = "--prompt_ids" if prompt is None else "tokenizer.json's ids for --prompt"
    raise UsageError(f"{source} should be token ids in [0, {config.vocab_size}) (the "
                     f"model's vocab_size): but got {outside}")
  problem = _length_problem(config, len(ids_in), max_new_tokens)
  if problem:
    raise UsageError(f"--max_new_tokens: {problem}")
  eos = model_checkpoint.eos_ids(hf, model_checkpoint.read_generation_config(checkpoint))
  ids, timing = generate_ids(params, config, ids_in, max_new_tokens=max_new_tokens, sampler=sampler,
                             seed=seed, eos_id=eos or None, quantized_cache=quantized_cache)
  if tokenizer is not None:
    # Together: decoded apart, a SentencePiece (Metaspace) tokenizer drops the
    # space that the first new token starts with ("w12" + "w449" for "w12 w449").
    print(tokenizer.decode(ids_in + ids.tolist()))
  print(timing.line(1, len(ids_in)))
  if print_ids:
    print(" ".join(str(i) for i in ids))


def _parse_ids(values: list[str]) -> list[int]:
  """`--prompt_ids`' strings as ints, or a UsageError naming the first that is not one."""
  ids = []
  for value in values:
    try:
      ids.append(int(value))
    except ValueError:
      raise UsageError(f"--prompt_ids should be comma-separated integer token ids: but got "
                       f"{value!r} in {','.join(values)!r}") from None
  return ids
