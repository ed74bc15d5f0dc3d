r"""Beam search with the bundled character-level model.

  python examples/beam_search.py
  python examples/beam_search.py --prompt='def parse(' --beam_width=8 --length_penalty=0

Prints each beam's continuation and its score: the summed log-probability of
its characters divided by (its length) ** --length_penalty. With --eos, a
beam ends at the first such character (a newline by default), and finished
beams compete on that score.

Shape legend:
  W: beam width
  P: prompt length
  M: max_new_tokens
"""

from __future__ import annotations

import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import numpy as np
from kvattn.models import charlm
from kvattn.models import transformer
from kvattn import beam_search

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_PROMPT = flags.DEFINE_string("prompt", "class Stack:\n    def ", "The prompt.")
_BEAM_WIDTH = flags.DEFINE_integer("beam_width", 4, "Beams kept at each step (W).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Characters to generate per beam.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0,
                                     "Scores are summed log-probabilities / length ** this.")
_EOS = flags.DEFINE_string("eos", None, "A character that ends a beam (e.g. a newline); "
                           "none by default.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params, config, vocab = charlm.load()
  params = jax.device_put(params)  # Once, not at every call (this also starts JAX up).
  prompt = vocab.encode(_PROMPT.value)
  if not len(prompt):
    raise app.UsageError("the prompt is empty")
  eos_id = None
  if _EOS.value is not None:
    ids = vocab.encode(_EOS.value)
    if len(ids) != 1 or ids[0] == charlm.PAD_ID:
      raise app.UsageError(f"--eos should be one character of the vocabulary: "
                           f"but got {_EOS.value!r}")
    eos_id = int(ids[0])
  w, m = _BEAM_WIDTH.value, _MAX_NEW_TOKENS.value
  caches = transformer.init_caches(config, w, len(prompt) + m - 1)
  tokens, scores = beam_search.beam_search(transformer.step_fn(config), params, caches, prompt,
                                           beam_width=w, max_new_tokens=m,
                                           length_penalty=_LENGTH_PENALTY.value, eos_id=eos_id,
                                           pad_id=charlm.PAD_ID)
  for i, (row, score) in enumerate(zip(np.asarray(tokens), np.asarray(scores))):
    print(f"--- beam {i + 1}: score {score:.4f}\n{_PROMPT.value}{vocab.decode(row)}")


if __name__ == "__main__":
  app.run(main)
