"""Tests of kvattn.beam_search with the bundled char-LM.

Beam width 1 is greedy decoding. For wider beams every returned score is
recomputed from scratch: the log-probabilities of the beam's tokens under
`transformer.forward` (no cache, so no reorder, in float64 sums), divided by
the length penalty. Compilations dominate the time: the shapes are few.
"""

import functools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn.models import charlm
from kvattn.models import transformer
from kvattn import beam_search
from kvattn import generation
from kvattn import sampling
from tests import compiles

REPO = pathlib.Path(__file__).absolute().parents[1]
PROMPT = "class Stack:\n    def "
M = 16  # max_new_tokens
TOL = dict(rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def _model():
  params, config, vocab = charlm.load()
  return jax.device_put(params), config, vocab


def _search(prompt, w, **kw):
  params, config, vocab = _model()
  ids = vocab.encode(prompt)
  caches = transformer.init_caches(config, w, len(ids) + M - 1)
  tokens, scores = beam_search.beam_search(transformer.step_fn(config), params, caches, ids,
                                           beam_width=w, max_new_tokens=M, **kw)
  return np.asarray(tokens), np.asarray(scores)


def _rescore(prompt, tokens, length_penalty, eos_id):
  """Each beam's summed log-probability / length ** length_penalty, from the full forward."""
  params, config, vocab = _model()
  ids = vocab.encode(prompt)
  p = len(ids)
  logits = transformer.forward(
      params, jnp.asarray(np.concatenate([np.broadcast_to(ids, (len(tokens), p)), tokens], axis=1)),
      config=config)
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  scores = []
  for b, row in enumerate(tokens):
    n = M if eos_id is None or eos_id not in row else int(np.argmax(row == eos_id)) + 1
    total = sum(logp[b, p - 1 + j, row[j]] for j in range(n))
    scores.append(total / n**length_penalty)
  return np.array(scores)


@pytest.mark.slow
def test_width_one_is_greedy_decoding():
  params, config, vocab = _model()
  ids = vocab.encode(PROMPT)[None]
  caches = transformer.init_caches(config, 1, ids.shape[1] + M - 1)
  greedy = generation.generate(transformer.step_fn(config), params, caches, ids,
                               np.ones(ids.shape, bool), max_new_tokens=M,
                               sampler=sampling.Sampler(), key=jax.random.key(0)).tokens
  tokens, scores = _search(PROMPT, 1, length_penalty=0.0)
  np.testing.assert_array_equal(tokens, np.asarray(greedy))
  np.testing.assert_allclose(scores, _rescore(PROMPT, tokens, 0.0, None), **TOL)


@pytest.mark.slow
def test_scores_are_sorted_and_are_the_log_probs_of_the_beams_compiled_once():
  vocab = _model()[2]
  newline = int(vocab.encode("\n")[0])
  # Same prompt length, another prompt: the same compilation.
  other = PROMPT.replace("Stack", "Queue")
  with compiles.compilations() as compiled:
    for prompt, length_penalty, eos_id in [(PROMPT, 0.0, newline), (PROMPT, 1.0, newline),
                                           (other, 2.0, int(vocab.encode(")")[0]))]:
      tokens, scores = _search(prompt, 4, length_penalty=length_penalty, eos_id=eos_id)
      assert np.all(np.diff(scores) <= 0), scores
      assert len({tuple(row) for row in tokens}) == 4  # Four different hypotheses.
      np.testing.assert_allclose(scores, _rescore(prompt, tokens, length_penalty, eos_id), **TOL)
      for row in tokens:  # After EOS, padding only.
        if eos_id in row:
          assert np.all(row[np.argmax(row == eos_id) + 1:] == charlm.PAD_ID)
  assert compiled.count("jit(_search)") == 1, compiled


@pytest.mark.slow
def test_width_one_with_eos_and_no_length_penalty_is_greedy_decoding_with_eos():
  """A finished beam beats its live rival: with no length penalty, adding tokens only
  lowers a sum of log-probabilities."""
  params, config, vocab = _model()
  comma = int(vocab.encode(",")[0])  # Greedy: "__init__(self, ...".
  ids = vocab.encode(PROMPT)[None]
  caches = transformer.init_caches(config, 1, ids.shape[1] + M - 1)
  greedy = np.asarray(
      generation.generate(transformer.step_fn(config), params, caches, ids,
                          np.ones(ids.shape, bool), max_new_tokens=M, sampler=sampling.Sampler(),
                          key=jax.random.key(0), eos_id=comma, pad_id=charlm.PAD_ID).tokens)
  assert comma in greedy[0, :-1]  # It ends early.
  tokens, scores = _search(PROMPT, 1, length_penalty=0.0, eos_id=comma)
  np.testing.assert_array_equal(tokens, greedy)
  np.testing.assert_allclose(scores, _rescore(PROMPT, tokens, 0.0, comma), **TOL)
  # A list of EOS ids, as generate takes: any of them ends a hypothesis.
  z = int(vocab.encode("Z")[0])  # Never generated here.
  for eos in ([z, comma], np.array([comma, z], np.int32)):
    listed, listed_scores = _search(PROMPT, 1, length_penalty=0.0, eos_id=eos)
    np.testing.assert_array_equal(listed, tokens)
    np.testing.assert_allclose(listed_scores, scores, **TOL)


def _bad(**kw):
  """A call of beam_search with kw changed; built lazily, so importing this file does
  not start the jax backend (under Bazel it is imported before conftest)."""
  def call():
    params, config, _ = _model()
    args = dict(prompt_tokens=np.ones(
        (3,), np.int32), beam_width=2, max_new_tokens=4, caches=transformer.init_caches(
            config, 2, 6)) | kw
    return beam_search.beam_search(transformer.step_fn(config), params, args.pop("caches"),
                                   args.pop("prompt_tokens"), **args)

  return call


@pytest.mark.parametrize("call, error, match", [
    (_bad(beam_width=0), ValueError, r"beam_width should be a positive int: but got 0"),
    (_bad(beam_width=3), ValueError, r"caches batch size should be B=3: but got 2"),
    (_bad(max_new_tokens=5), ValueError,
     r"caches max_len should be at least P \+ M - 1 = 3 \+ 5 - 1 = 7: but got S=6"),
    (_bad(prompt_tokens=np.ones((2, 3), np.int32)), ValueError,
     r"prompt_tokens shape should be \(P,\) or \(1, P\): but got \(2, 3\)"),
    (_bad(prompt_tokens=np.ones((3,), np.float32)), ValueError,
     r"prompt_tokens dtype should be an integer"),
    (_bad(prompt_tokens=np.ones((0,), np.int32)), ValueError,
     r"prompt_tokens should hold at least one token"),
    (_bad(length_penalty="1"), ValueError, r"length_penalty should be a real number"),
    (_bad(prompt_tokens=np.array([1, -1, 2], np.int32)), ValueError,
     r"prompt_tokens should be ids in \[0, V\)=\[0, 98\): but got -1 at row 0, column 1"),
    (_bad(eos_id=1.5), ValueError,
     r"eos_id should be None, an int or a non-empty list of ints: but got 1.5"),
    (_bad(caches=[np.zeros((2, 6, 4, 32))]), TypeError,
     r"caches should be a KVCache or a pytree whose leaves are all in KVCaches: but got ndarray"),
])
def test_bad_arguments_raise(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.slow
def test_main_prints_each_beam_and_its_score():
  w = 3
  run = subprocess.run([
      sys.executable, "examples/beam_search.py", f"--prompt={PROMPT}", f"--beam_width={w}",
      f"--max_new_tokens={M}", "--length_penalty=0.5"
  ], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  heads = re.findall(r"^--- beam (\d+): score (-?\d+\.\d+)$", run.stdout, flags=re.MULTILINE)
  assert [int(i) for i, _ in heads] == list(range(1, w + 1)), run.stdout
  printed = [float(s) for _, s in heads]
  assert printed == sorted(printed, reverse=True)
  tokens, scores = _search(PROMPT, w, length_penalty=0.5)
  np.testing.assert_allclose(printed, scores, atol=2e-4)  # Printed to 4 decimals.
  texts = re.split(r"^--- beam \d+: score -?\d+\.\d+\n", run.stdout, flags=re.MULTILINE)[1:]
  vocab = _model()[2]
  assert texts == [PROMPT + vocab.decode(row) + "\n" for row in tokens]
