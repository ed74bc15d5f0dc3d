"""Per-request settings: what to draw and when to stop, checked once when a request arrives.

`SamplingParams` holds a request's settings; `check` refuses, with a
ValueError naming the setting, anything the engine cannot honour exactly
(never silently dropped). The engine turns them into per-row arrays of one
compiled step (`kvattn.serving.sampler`), so a new temperature, top-k,
top-p, min-p or seed never compiles anything.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import numpy as np

from kvattn._checks import is_int

# Seeds are uint32: PRNGKey(seed) takes them whole.
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request draws its tokens and when it stops.

  Attributes:
    max_tokens: most tokens to draw (>= 1).
    temperature: >= 0; 0 is greedy (top_k, top_p, min_p, seed then change
      nothing).
    top_k: keep the k most likely tokens (ties with the k-th kept); 0 or
      None keeps all.
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p, in (0, 1].
    min_p: keep tokens with probability >= min_p times the most likely
      one's, in [0, 1].
    stop_token_ids: drawing one of these ends the request ("stop"); the
      token is the last of the output.
    seed: None, or an int in [0, 2**32): token j of the output is drawn with
      `fold_in(PRNGKey(seed), j)`, so a seed gives the same tokens whatever
      else the engine runs. None: the engine picks one.
    n: outputs drawn from one prompt (its prefill runs once; the outputs
      share its pages). Output i draws as one request with seed `seed + i`.
    logprobs: None, or the number of most likely alternatives (0 for none)
      to report beside each drawn token's log-probability, up to the
      engine's `max_logprobs`. Log-probabilities are the model's (before
      temperature and the filters).
    ignore_eos: when True the engine does not add the model's end-of-sequence
      ids to stop_token_ids.

  The filters apply in Hugging Face's order: temperature, top-k, top-p,
  min-p.
  """

  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  min_p: float = 0.0
  stop_token_ids: Sequence[int] = ()
  seed: int | None = None
  n: int = 1
  logprobs: int | None = None
  ignore_eos: bool = False

  def __post_init__(self):
    stop = self.stop_token_ids
    if isinstance(stop, (str, bytes)) or not hasattr(stop, "__iter__"):
      raise ValueError(f"stop_token_ids should be a sequence of token ids: but got {stop!r}")
    object.__setattr__(self, "stop_token_ids", tuple(stop))

  def check(self, vocab_size: int, max_logprobs: int) -> None:
    """Raises ValueError naming the first setting out of range."""
    _int_in("max_tokens", self.max_tokens, 1, None)
    _number_in("temperature", self.temperature, 0.0, None)
    if self.top_k is not None:
      _int_in("top_k", self.top_k, 0, None)
    _number_in("top_p", self.top_p, 0.0, 1.0, open_low=True)
    _number_in("min_p", self.min_p, 0.0, 1.0)
    for token in self.stop_token_ids:
      _int_in("stop_token_ids entry", token, 0, vocab_size - 1)
    _int_in("n", self.n, 1, None)
    if self.seed is not None:
      _int_in("seed", self.seed, 0, MAX_SEED)
      if self.seed + self.n - 1 > MAX_SEED:
        raise ValueError(f"seed + n - 1 should be at most {MAX_SEED}: but got seed={self.seed}, "
                         f"n={self.n}")
    if self.logprobs is not None:
      _int_in("logprobs", self.logprobs, 0, max_logprobs)
    if not isinstance(self.ignore_eos, (bool, np.bool_)):
      raise ValueError(f"ignore_eos should be a bool: but got {self.ignore_eos!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _int_in(name, value, low, high) -> None:
  if not is_int(value) or value < low or (high is not None and value > high):
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} should be an int {span}: but got {value!r}")


def _number_in(name, value, low, high, open_low=False) -> None:
  number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
  ok = number and np.isfinite(value) and (value > low if open_low else value >= low)
  ok = ok and (high is None or value <= high)
  if not ok:
    span = f"{'(' if open_low else '['}{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} should be a number {'in ' if high is not None else ''}{span}: but "
                     f"got {value!r}")
