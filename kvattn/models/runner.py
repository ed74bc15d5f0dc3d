"""Runs `kvattn.generation` on a model and times its stages apart.

The examples' driver (generate.py, gpt2.py, llama.py): compile time, prefill
time and decode speed are measured separately, and a streaming mode hands
each new column to a callback.

Shape legend:
  B: batch size
  P: padded prompt length
  N: max_new_tokens
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from absl import app

from kvattn import generation
from kvattn import sampling
from kvattn.models import checkpoint as model_checkpoint
from kvattn.models import transformer


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


def run(step_fn: Callable, params: Any, caches: Any, tokens: np.ndarray, mask: np.ndarray, *,
        max_new_tokens: int, sampler: sampling.Sampler, seed: int = 0,
        eos_id: int | list[int] | None = None, pad_id: int = 0, prefill_mode: str = "one_pass",
        chunk_size: int | None = None, on_token: Callable[[np.ndarray], None] | None = None
        ) -> tuple[np.ndarray, np.ndarray, Timing]:
  """Generates for prompts `tokens [B, P]` (mask `[B, P]`) and times the stages.

  Without `on_token` the decode loop is the compiled `lax.while_loop`; its two
  stages are compiled ahead of time, so compile time is measured apart. With
  `on_token`, `kvattn.generate_stream` runs and each column (int `[B]`) is
  passed to `on_token` as it is drawn; compile time is then a warm-up of the
  prefill and one decode step.

  Returns:
    `(tokens [B, N], lengths [B], Timing)`, numpy.
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
    start = generation.start.lower(step_fn, params, caches, tokens, mask, key,
                                   **start_kw).compile()
    state_shape = jax.eval_shape(functools.partial(generation.start, step_fn, **start_kw),
                                 params, caches, tokens, mask, key)
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


def generate_ids(params: transformer.Params, config: transformer.Config, prompt_ids: list[int],
                 *, max_new_tokens: int, sampler: sampling.Sampler, seed: int = 0,
                 eos_id: int | list[int] | None = None) -> tuple[np.ndarray, Timing]:
  """Continues one prompt; returns the new ids (up to and including EOS) and timing."""
  if config.max_positions and len(prompt_ids) + max_new_tokens - 1 > config.max_positions:
    raise ValueError(
        f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) - 1 should fit "
        f"the model's {config.max_positions} positions")
  tokens = np.asarray([prompt_ids], np.int32)
  mask = np.ones(tokens.shape, bool)
  caches = transformer.init_caches(config, 1, tokens.shape[1] + max_new_tokens - 1,
                                   dtype=jax.numpy.dtype(params["embed"].dtype))
  out, lengths, timing = run(transformer.step_fn(config), params, caches, tokens,
                                      mask, max_new_tokens=max_new_tokens, sampler=sampler,
                                      seed=seed, eos_id=eos_id)
  return out[0, :lengths[0]], timing


def main_for_checkpoint(load: Callable[[str], tuple[Any, transformer.Config, dict]], *,
                        checkpoint: str, prompt: str | None, prompt_ids: list[str] | None,
                        max_new_tokens: int, sampler: sampling.Sampler, seed: int,
                        print_ids: bool) -> None:
  """The body of the checkpoint examples' mains (gpt2.py, llama.py): load, generate, print.

  Prints the text (with a tokenizer.json), a timing line, and with
  `print_ids` a last line of the generated ids, space separated.
  """
  if (prompt is None) == (prompt_ids is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  params, config, hf = load(checkpoint)
  params = jax.device_put(params)  # Once, not as part of the timed prefill.
  tokenizer = model_checkpoint.read_tokenizer(checkpoint)
  if prompt is not None:
    if tokenizer is None:
      raise app.UsageError(f"--prompt needs {checkpoint}/tokenizer.json; or pass --prompt_ids")
    ids_in = tokenizer.encode(prompt).ids
  else:
    ids_in = [int(i) for i in prompt_ids]
  if not ids_in:
    raise app.UsageError("the prompt is empty")
  eos = model_checkpoint.eos_ids(hf)
  ids, timing = generate_ids(params, config, ids_in, max_new_tokens=max_new_tokens,
                             sampler=sampler, seed=seed, eos_id=eos or None)
  if tokenizer is not None:
    print(tokenizer.decode(ids_in) + tokenizer.decode(ids.tolist()))
  print(timing.line(1, len(ids_in)))
  if print_ids:
    print(" ".join(str(i) for i in ids))
