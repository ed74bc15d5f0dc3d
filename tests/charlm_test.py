"""Tests of kvattn/models/charlm.py: vocabulary and checkpoint (generation: generate_example_test)."""

import json

import jax
import numpy as np
import pytest

import kvattn
from kvattn.models import charlm
from kvattn.models import transformer

TINY = transformer.Config(vocab_size=0, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                          head_dim=8, d_ff=32, rope_base=10_000.0)


def test_vocab_round_trip_and_unknown_characters():
  vocab = charlm.Vocab.from_text("def f(x):\n    return x\n")
  assert vocab.chars[0] == "\x00" and len(vocab) == len(set("def f(x):\n    return x\n")) + 1
  text = "def x(f):\n"
  np.testing.assert_array_equal(vocab.decode(vocab.encode(text)), text)
  assert vocab.encode("é")[0] == charlm.PAD_ID and vocab.decode(vocab.encode("dé")) == "d"
  assert len(charlm.Vocab.from_text("aab", min_count=2)) == 2


def test_encode_batch_is_right_padded():
  vocab = charlm.Vocab.from_text("abc")
  tokens, mask = charlm.encode_batch(vocab, ["abc", "b"])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [2, 0, 0]])


def test_checkpoint_round_trip(tmp_path):
  vocab = charlm.Vocab.from_text("hello world")
  config = TINY._replace(vocab_size=len(vocab), window_pattern=(4, None),
                         rope_scaling=kvattn.rope.Scaling("linear", 2.0))
  params = transformer.init_params(jax.random.key(0), config)
  path = tmp_path / "lm.npz"
  charlm.save(path, params, config, vocab, dtype=np.float32)
  loaded, loaded_config, loaded_vocab = charlm.load(path)
  assert loaded_config == config and loaded_vocab.chars == vocab.chars
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize(
    "old_fields, window_pattern",
    [
        (dict(sliding_window=4, window_pattern=[]), (4,)),
        (dict(sliding_window=None, window_pattern=[4, None]), (4, None)),
        (dict(sliding_window=None), ()),
        (dict(sliding_window=3), (3,)),  # Written before window_pattern existed.
    ])
def test_checkpoints_with_the_old_sliding_window_field_load(tmp_path, old_fields, window_pattern):
  vocab = charlm.Vocab.from_text("hello world")
  config = TINY._replace(vocab_size=len(vocab))
  path = tmp_path / "lm.npz"
  charlm.save(path, transformer.init_params(jax.random.key(0), config), config, vocab)
  with np.load(path) as f:
    arrays = dict(f)
  fields = {k: v for k, v in config._asdict().items() if k != "window_pattern"}
  arrays["config"] = np.array(json.dumps({**fields, **old_fields}))
  np.savez(path, **arrays)
  assert charlm.load(path)[1] == config._replace(window_pattern=window_pattern)


def test_bundled_checkpoint_is_small_and_loads():
  assert charlm.DEFAULT_CHECKPOINT.stat().st_size < 5e6
  params, config, vocab = charlm.load()
  assert config.vocab_size == len(vocab) and "\n" in vocab.chars and "d" in vocab.chars
  assert params["embed"].shape == (config.vocab_size, config.d_model)
