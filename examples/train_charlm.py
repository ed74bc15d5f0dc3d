r"""Trains the bundled character-level LM on the Python standard library's sources.

Every machine with Python has the corpus (see `kvattn.models.training` for
the corpus, loss and optimizer). The model is written to `--output`, by
default charlm.npz in the current directory, never over the bundled model
unless that path is given: a short trial run would otherwise turn
`examples/generate.py`'s output into noise. Generate with the result:

  python examples/train_charlm.py --time_budget_s=60
  python examples/generate.py --checkpoint=charlm.npz

The bundled model (1.5 MB), the default of `kvattn.models.charlm.load()` and
`examples/generate.py`, is rebuilt with its path given explicitly:

  python examples/train_charlm.py --output=kvattn/models/data/charlm.npz
"""

from __future__ import annotations

import logging
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags

from kvattn.models import charlm
from kvattn.models import training
from kvattn.models import transformer

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_OUTPUT = flags.DEFINE_string(
    "output", "charlm.npz",
    "Checkpoint to write; the bundled model is overwritten only if its path is given.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps (the LR schedule's length).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Characters per sequence.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Transformer layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and batches.")
_TIME_BUDGET_S = flags.DEFINE_float(
    "time_budget_s", 600.0, "Seconds; the LR schedule ends by then and the model is saved.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 200, "Characters rarer than this map to padding.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  text = training.read_corpus()
  vocab = charlm.Vocab.from_text(text, min_count=_MIN_COUNT.value)
  data = vocab.encode(text)
  print(f"corpus: {len(text) / 1e6:.1f}M characters of the standard library, "
        f"vocabulary {len(vocab)}")
  config = transformer.Config(vocab_size=len(vocab), num_layers=_NUM_LAYERS.value,
                              d_model=_D_MODEL.value, num_heads=_NUM_HEADS.value,
                              num_kv_heads=_NUM_HEADS.value,
                              head_dim=_D_MODEL.value // _NUM_HEADS.value, d_ff=4 * _D_MODEL.value,
                              rope_base=10_000.0)
  params, loss = training.train(config, data, steps=_STEPS.value, batch_size=_BATCH_SIZE.value,
                                seq_len=_SEQ_LEN.value, lr=_LR.value, seed=_SEED.value,
                                time_budget_s=_TIME_BUDGET_S.value)
  charlm.save(_OUTPUT.value, params, config, vocab)
  size = pathlib.Path(_OUTPUT.value).stat().st_size
  print(f"final loss {loss:.3f} nats/char; wrote {_OUTPUT.value} ({size / 1e6:.1f} MB)")
  print(f"generate with: python examples/generate.py --checkpoint={_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
