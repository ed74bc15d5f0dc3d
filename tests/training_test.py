"""Tests of examples/training.py: corpus, schedule, Adam, and a short training run."""

import jax.numpy as jnp
import numpy as np

from kvattn.models import charlm
from kvattn.models import training
from kvattn.models import transformer

TINY = transformer.Config(vocab_size=0, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                          head_dim=8, d_ff=32, rope_base=10_000.0)


def test_corpus_is_the_standard_library():
  text = training.read_corpus(max_chars=100_000)
  assert len(text) == 100_000 and "def " in text and "import " in text


def test_learning_rate_warms_up_then_decays_to_a_tenth():
  lr = [float(training.learning_rate(p, 1.0)) for p in (0.0, 0.025, 0.05, 0.525, 1.0)]
  np.testing.assert_allclose(lr, [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)


def test_adam_first_step_moves_each_weight_by_lr():
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
  grads = {"w": jnp.array([[0.3, -4.0]]), "b": jnp.array([1e-3])}
  new, state = training.adam_update(params, grads, training.adam_init(params), 0.1)
  # Bias-corrected Adam's first step is lr * sign(grad).
  np.testing.assert_allclose(new["w"], [[0.9, -1.9]], rtol=1e-5)
  np.testing.assert_allclose(new["b"], [0.4], rtol=1e-4)
  assert int(state.step) == 1


def test_training_lowers_the_loss():
  text = training.read_corpus(max_chars=20_000)
  vocab = charlm.Vocab.from_text(text)
  data = vocab.encode(text)
  config = TINY._replace(vocab_size=len(vocab))
  logs = []
  _, loss = training.train(config, data, steps=30, batch_size=8, seq_len=32, lr=1e-2, log_every=10,
                           log=logs.append)
  first = float(logs[0].split("loss ")[1].split()[0])
  assert loss < first - 0.5, logs
  assert "steps/s" in logs[-1] and "eta" in logs[-1]


def test_sample_batch_windows_are_contiguous():
  data = np.arange(1000, dtype=np.int32)
  batch = training.sample_batch(np.random.default_rng(0), data, 4, 16)
  assert batch.shape == (4, 17)
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
