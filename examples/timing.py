"""Timing side by side: cases run interleaved, round after round, medians kept.

These machines are shared and noisy, so the variants of a table are timed in
one process, in turn, and each cell is the median over rounds.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class Stateful:
  """A timed call plus an untimed reset between calls (e.g. of a donated cache)."""
  def __init__(self, run: Callable[[], object], reset: Callable[[], None] = lambda: None):
    self.run = run
    self.reset = reset


def time_interleaved(cases: dict[str, Stateful], rounds: int) -> dict[str, tuple[float, float]]:
  """Runs every case once per round, in turn; returns {name: (median ms, min ms)}."""
  for case in cases.values():  # Compile and warm up.
    jax.block_until_ready(case.run())
    case.reset()
  times = {name: [] for name in cases}
  for _ in range(rounds):
    for name, case in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(case.run())
      times[name].append((time.perf_counter() - start) * 1e3)
      case.reset()
  return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def donated_calls(fn, cache, *args, index: int | None = None) -> Stateful:
  """Calls fn(*args, cache) -> (out, cache) with the cache donated, resetting its index."""
  state = {"cache": cache}

  def run():
    out, state["cache"] = fn(*args, state["cache"])
    return out

  def reset():
    if index is not None:
      state["cache"] = state["cache"]._replace(index=jnp.asarray(index, jnp.int32))

  return Stateful(run, reset)
