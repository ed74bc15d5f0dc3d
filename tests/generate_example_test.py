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
from kvattn.models import runner
from kvattn.models import transformer
from kvattn import generation
from kvattn import sampling

# Whole programs, models or processes: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

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
    out[prefill_mode] = np.asarray(
        generation.generate(transformer.step_fn(config), params, caches, tokens, mask,
                            max_new_tokens=N, sampler=GREEDY, key=jax.random.key(0),
                            prefill_mode=prefill_mode,
                            chunk_size=5 if prefill_mode == "chunked" else None).tokens)
  return out


def test_greedy_tokens_are_the_same_for_every_prefill(greedy_tokens, model):
  np.testing.assert_array_equal(greedy_tokens["chunked"], greedy_tokens["one_pass"])
  np.testing.assert_array_equal(greedy_tokens["forced"], greedy_tokens["one_pass"])
  text = model[2].decode(greedy_tokens["one_pass"][0])
  assert text.isascii() and len(text) == N


def test_stream_hands_over_the_same_tokens(greedy_tokens, model):
  seen = []
  texts, tokens, lengths, timing = charlm.generate_text(*model, PROMPTS, max_new_tokens=N,
                                                        sampler=GREEDY, on_token=seen.append)
  np.testing.assert_array_equal(tokens, greedy_tokens["one_pass"])
  np.testing.assert_array_equal(np.stack(seen, axis=1), tokens)
  np.testing.assert_array_equal(lengths, [N] * 3)
  assert texts == [model[2].decode(row) for row in tokens]
  assert timing.decode_tokens == 3 * (N - 1) and timing.prefill_s > 0
  assert "tokens/s" in timing.line(3, 10)


def test_main_prints_the_text_the_timing_and_the_ids(greedy_tokens):
  flags = [f"--prompt={p}" for p in PROMPTS] + [
      f"--max_new_tokens={N}", "--temperature=0", "--prefill_mode=chunked", "--chunk_size=3",
      "--print_ids"
  ]
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


def _run(script, *flags, cwd=REPO):
  return subprocess.run([sys.executable, str(REPO / "examples" / script), *flags], cwd=cwd,
                        capture_output=True, text=True, timeout=300, check=False)


def test_training_writes_outside_the_package_and_generate_reads_it(tmp_path):
  """Issue 20, item 13: a trial run of train_charlm.py overwrote the bundled model.

  Now --output defaults to charlm.npz in the working directory, and
  generate.py runs it with --checkpoint (its int8 cache too).
  """
  bundled = charlm.DEFAULT_CHECKPOINT.read_bytes()
  run = _run("train_charlm.py", "--steps=2", "--batch_size=2", "--seq_len=16", "--num_layers=1",
             "--d_model=16", "--num_heads=2", cwd=tmp_path)
  assert run.returncode == 0, run.stderr
  assert charlm.DEFAULT_CHECKPOINT.read_bytes() == bundled
  trained = tmp_path / "charlm.npz"
  assert "python examples/generate.py --checkpoint=charlm.npz" in run.stdout
  params, config, vocab = charlm.load(trained)
  assert (config.num_layers, config.d_model) == (1, 16)

  prompt = "def f("
  run = _run("generate.py", f"--checkpoint={trained}", f"--prompt={prompt}", "--max_new_tokens=6",
             "--temperature=0", "--print_ids", "--quantized_cache")
  assert run.returncode == 0, run.stderr
  _, tokens, _, _ = charlm.generate_text(params, config, vocab, [prompt], max_new_tokens=6,
                                         sampler=GREEDY, quantized_cache=True)
  assert [int(i) for i in run.stdout.splitlines()[-1].split()] == tokens[0].tolist()


def test_quantized_cache_is_int8_and_keeps_the_bundled_greedy_tokens(greedy_tokens, model,
                                                                     monkeypatch):
  """Issue 20, item 10: `generate_text(..., quantized_cache=True)` runs on int8 caches."""
  seen = []
  run = runner.run

  def spy(step_fn, params, caches, *args, **kwargs):
    seen.append(caches)
    return run(step_fn, params, caches, *args, **kwargs)

  monkeypatch.setattr(runner, "run", spy)
  _, tokens, _, _ = charlm.generate_text(*model, PROMPTS, max_new_tokens=N, sampler=GREEDY,
                                         quantized_cache=True)
  assert seen[0][0].k.dtype == np.int8 and seen[0][0].k_scale.dtype == np.float32
  np.testing.assert_array_equal(tokens, greedy_tokens["one_pass"])


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint=/no/such/charlm.npz"
     ], "--checkpoint should be a char-LM .npz file: but /no/such/charlm.npz does not exist"),
    (["--max_new_tokens=0"], "--max_new_tokens should be at least 1: but got 0"),
    (["--prompt="], "--prompt should not be empty: but got ['']"),
    (["--top_p=1.5"], "--top_p should be in (0, 1] or None: but got 1.5"),
    (["--temperature=-1"], "--temperature should be a number >= 0: but got -1.0"),
])
def test_flag_mistakes_are_usage_errors(flags, message):
  """Issue 20, item 12: a usage message naming the flag, not a traceback."""
  run = _run("generate.py", *flags)
  assert run.returncode == 1, (run.stdout, run.stderr)
  assert "Traceback" not in run.stderr and message in run.stderr, run.stderr
