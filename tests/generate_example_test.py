"""Tests of examples/generate.py (and charlm.generate_text, runner.run) with the bundled model.

Compilations of the bundled model dominate the time here, so the tests share
them: the greedy tokens are computed once per prefill mode, and the
command line (a separate process) must print the same ones.
"""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from kvattn.models import charlm
from kvattn.models import transformer
from kvattn import generation
from kvattn import sampling

REPO = pathlib.Path(__file__).absolute().parents[1]
PROMPTS = ["def f(", "import sys\n", "class Stack:\n    def push(self, item):\n"]
N = 24
GREEDY = sampling.Sampler()


@pytest.fixture(scope="module")
def model():
  return charlm.load()


@pytest.fixture(scope="module")
def greedy_tokens(model):
  """Greedy tokens [B, N] for PROMPTS, per prefill mode."""
  params, config, vocab = model
  tokens, mask = charlm.encode_batch(vocab, PROMPTS)
  out = {}
  for prefill_mode in generation.PREFILL_MODES:
    caches = transformer.init_caches(config, len(PROMPTS), tokens.shape[1] + N - 1)
    out[prefill_mode] = np.asarray(generation.generate(
        transformer.step_fn(config), params, caches, tokens, mask, max_new_tokens=N,
        sampler=GREEDY, key=jax.random.key(0), prefill_mode=prefill_mode,
        chunk_size=5 if prefill_mode == "chunked" else None).tokens)
  return out


def test_greedy_tokens_are_the_same_for_every_prefill(greedy_tokens, model):
  np.testing.assert_array_equal(greedy_tokens["chunked"], greedy_tokens["one_pass"])
  np.testing.assert_array_equal(greedy_tokens["forced"], greedy_tokens["one_pass"])
  text = model[2].decode(greedy_tokens["one_pass"][0])
  assert text.isascii() and len(text) == N


def test_stream_hands_over_the_same_tokens(greedy_tokens, model):
  seen = []
  texts, tokens, lengths, timing = charlm.generate_text(
      *model, PROMPTS, max_new_tokens=N, sampler=GREEDY, on_token=seen.append)
  np.testing.assert_array_equal(tokens, greedy_tokens["one_pass"])
  np.testing.assert_array_equal(np.stack(seen, axis=1), tokens)
  np.testing.assert_array_equal(lengths, [N] * 3)
  assert texts == [model[2].decode(row) for row in tokens]
  assert timing.decode_tokens == 3 * (N - 1) and timing.prefill_s > 0
  assert "tokens/s" in timing.line(3, 10)


def test_main_prints_the_text_the_timing_and_the_ids(greedy_tokens):
  flags = [f"--prompt={p}" for p in PROMPTS] + [
      f"--max_new_tokens={N}", "--temperature=0", "--prefill_mode=chunked", "--chunk_size=3",
      "--print_ids"]
  run = subprocess.run([sys.executable, "examples/generate.py", *flags], cwd=REPO,
                       capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  assert "Unable to initialize backend" not in run.stderr + run.stdout, run.stderr
  lines = run.stdout.splitlines()
  assert lines[0] == "--- prompt 1" and lines[1].startswith(PROMPTS[0])
  timing = lines[-2]
  assert timing.startswith(f"prefill 3 x {max(map(len, PROMPTS))} tokens: ")
  assert "ms | decode 69 tokens: " in timing and "tokens/s | compile " in timing
  printed = [int(i) for i in lines[-1].split()]
  assert printed == greedy_tokens["one_pass"][0].tolist()


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
