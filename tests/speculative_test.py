"""Tests of kvattn.speculative: the target's own greedy tokens, whatever the draft.

The target is the bundled char-LM (trained, so its greedy choices are far
from ties); the drafts are its first layer, the target itself (every draft
accepted) and an unrelated random model (almost none accepted). In every case
the tokens must be exactly those of `kvattn.generate` with the target alone,
for ragged batches padded on either side. Compilations dominate the time, so
the shapes are few: B in {1, 3} and one M.
"""

import functools
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import kvattn
from kvattn.models import charlm
from kvattn.models import transformer
from kvattn import generation
from kvattn import sampling
from kvattn import speculative
from tests import compiles

REPO = pathlib.Path(__file__).absolute().parents[1]
PROMPTS = ["class Stack:\n    def push(self, item):\n", "def f(", "import sys\n"]
M = 20  # max_new_tokens
RANDOM = transformer.Config(vocab_size=98, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1,
                            head_dim=8, d_ff=32, rope_base=10_000.0)


@functools.lru_cache(maxsize=None)
def _model():
  params, config, vocab = charlm.load()
  return jax.device_put(params), config, vocab


@functools.lru_cache(maxsize=None)
def _draft(kind):
  """(params, config) of a draft for the char-LM."""
  params, config, _ = _model()
  if kind == "same":
    return params, config
  if kind == "one_layer":
    return dict(params, layers=jax.tree.map(lambda a: a[:1],
                                            params["layers"])), config._replace(num_layers=1)
  assert RANDOM.vocab_size == config.vocab_size
  return transformer.init_params(jax.random.key(7), RANDOM), RANDOM


def _prompts(batch, left_pad):
  """Tokens [B, P] and mask [B, P]: the first `batch` prompts, ragged, padded left or right."""
  tokens, mask = charlm.encode_batch(_model()[2], PROMPTS[:batch])
  if left_pad:
    n = mask.sum(axis=1)
    tokens = np.stack([np.roll(row, len(row) - k) for row, k in zip(tokens, n)])
    mask = np.stack([np.roll(row, len(row) - k) for row, k in zip(mask, n)])
  return tokens, mask


@functools.lru_cache(maxsize=None)
def _greedy(batch, left_pad):
  """The target alone: `kvattn.generate` with a greedy sampler, numpy [B, M]."""
  params, config, _ = _model()
  tokens, mask = _prompts(batch, left_pad)
  caches = transformer.init_caches(config, batch, tokens.shape[1] + M - 1)
  return np.asarray(
      generation.generate(transformer.step_fn(config), params, caches, tokens, mask,
                          max_new_tokens=M, sampler=sampling.Sampler(),
                          key=jax.random.key(0)).tokens)


def _speculative(kind, tokens, mask, k, max_len=None):
  params, config, _ = _model()
  draft_params, draft_config = _draft(kind)
  b, p = tokens.shape
  s = max_len or speculative.required_max_len(b, p, M, k)
  return speculative.speculative_generate(transformer.step_fn(config), params,
                                          transformer.init_caches(config, b, s),
                                          transformer.step_fn(draft_config), draft_params,
                                          transformer.init_caches(draft_config, b, s), tokens, mask,
                                          max_new_tokens=M, num_draft=k)


@pytest.mark.parametrize("kind, batch, left_pad, k", [
    ("one_layer", 3, False, 1),
    ("one_layer", 3, True, 3),
    ("one_layer", 1, False, 4),
    ("same", 1, False, 3),
    ("random", 3, False, 2),
])
@pytest.mark.slow
def test_tokens_are_the_target_alones_greedy_tokens(kind, batch, left_pad, k):
  tokens, mask = _prompts(batch, left_pad)
  out, stats = _speculative(kind, tokens, mask, k)
  np.testing.assert_array_equal(np.asarray(out), _greedy(batch, left_pad))
  rounds, drafted, accepted = int(stats.rounds), int(stats.drafted), int(stats.accepted)
  # Each round adds 1 to k + 1 tokens to every row still short of M.
  assert -(-(M - 1) // (k + 1)) <= rounds <= M - 1
  assert 0 <= accepted <= drafted <= batch * k * rounds
  if kind == "same":  # The target drafting for itself: every draft accepted.
    assert accepted == drafted == k * rounds and rounds == -(-(M - 1) // (k + 1))
    assert stats.acceptance_rate == 1.0
  if kind == "random":
    assert stats.acceptance_rate < 0.5


@pytest.mark.slow
def test_eos_ends_each_row_as_in_generate():
  """eos_id (an int or a list) and pad_id: the tokens of generate with the target alone,
  greedy, with the same EOS; once every row has ended, no more rounds run."""
  params, config, vocab = _model()
  draft_params, draft_config = _draft("one_layer")
  tokens, mask = _prompts(3, False)
  b, p = tokens.shape
  greedy = _greedy(3, False)
  # An EOS every row reaches before M: the token each row draws third.
  eos = [int(t) for t in greedy[:, 2]]
  want = generation.generate(transformer.step_fn(config), params,
                             transformer.init_caches(config, b, p + M - 1), tokens, mask,
                             max_new_tokens=M, eos_id=eos, pad_id=97).tokens
  assert np.all(np.asarray(want)[:, -1] == 97)  # Every row ended early.
  s = speculative.required_max_len(b, p, M, 2)
  out, stats = speculative.speculative_generate(transformer.step_fn(config), params,
                                                transformer.init_caches(config, b, s),
                                                transformer.step_fn(draft_config), draft_params,
                                                transformer.init_caches(draft_config, b, s), tokens,
                                                mask, max_new_tokens=M, num_draft=2, eos_id=eos,
                                                pad_id=97)
  np.testing.assert_array_equal(out, want)
  assert int(stats.rounds) <= 3  # Three tokens per row at most: rounds stop with them.
  with pytest.raises(ValueError, match=r"eos_id should be None, an int or a non-empty list"):
    speculative.speculative_generate(transformer.step_fn(config), params,
                                     transformer.init_caches(config, b, s),
                                     transformer.step_fn(draft_config), draft_params,
                                     transformer.init_caches(draft_config, b, s), tokens, mask,
                                     max_new_tokens=M, num_draft=2, eos_id="1")


@pytest.mark.slow
def test_one_round_compiles_once_and_runs_from_python_as_in_the_loop():
  params, config, vocab = _model()
  draft_params, draft_config = _draft("one_layer")
  k = 2
  # Two batches of the same shape, other prompts: other numbers of rounds.
  other = ["    return x\n", "for i in ", PROMPTS[0].replace("Stack", "Queue")]
  batches = [_prompts(3, False), charlm.encode_batch(vocab, other)]
  assert batches[0][0].shape == batches[1][0].shape
  # test_eos_ends_each_row_as_in_generate, run before, compiles start at these
  # shapes: without this, it would not compile here.
  jax.clear_caches()
  with compiles.compilations() as compiled:
    for tokens, mask in batches:
      s = speculative.required_max_len(3, tokens.shape[1], M, k)
      state = speculative.start(transformer.step_fn(config), params,
                                transformer.init_caches(config, 3, s),
                                transformer.step_fn(draft_config), draft_params,
                                transformer.init_caches(draft_config, 3, s), tokens, mask,
                                max_new_tokens=M, num_draft=k)
      rounds = 0
      while bool(np.any(np.asarray(state.count) < M)):
        state = speculative.advance(transformer.step_fn(config), params,
                                    transformer.step_fn(draft_config), draft_params, state,
                                    num_draft=k)
        rounds += 1
      assert int(state.stats.rounds) == rounds > 1
      assert not bool(kvattn.overflowed((state.target_caches, state.draft_caches)))
      loop, _ = _speculative("one_layer", tokens, mask, k)
      np.testing.assert_array_equal(state.tokens[:, :M], loop)
  assert compiled.count("jit(advance)") == 1, compiled
  assert compiled.count("jit(start)") == 1, compiled
  assert compiled.count("jit(finish)") <= 1, compiled  # 0 if another test compiled it.


def test_required_max_len_is_exactly_enough_for_one_row():
  tokens, mask = _prompts(1, False)
  k = 4
  s = speculative.required_max_len(1, tokens.shape[1], M, k)
  assert s == tokens.shape[1] + M + k - 1
  assert speculative.required_max_len(3, tokens.shape[1], M, k) == tokens.shape[1] + (M - 1) * 5
  with pytest.raises(
      ValueError, match=rf"target_caches max_len should be at least "
      rf"P \+ M \+ k - 1 = {tokens.shape[1]} \+ {M} \+ {k} - 1 = {s}: but got "
      rf"S={s - 1}"):
    _speculative("one_layer", tokens, mask, k, max_len=s - 1)


def _bad(**kw):
  """A call of speculative_generate with kw changed; built lazily, so importing this
  file does not start the jax backend (under Bazel it is imported before conftest)."""
  def call():
    params, config, _ = _model()
    tokens, mask = np.ones((2, 3), np.int32), np.ones((2, 3), bool)
    args = dict(target_step_fn=transformer.step_fn(config), target_params=params,
                target_caches=transformer.init_caches(
                    config, 2, 40), draft_step_fn=transformer.step_fn(config), draft_params=params,
                draft_caches=transformer.init_caches(config, 2, 40), prompt_tokens=tokens,
                prompt_mask=mask, max_new_tokens=4, num_draft=2) | kw
    return speculative.speculative_generate(**args)

  return call


@pytest.mark.parametrize(
    "call, error, match",
    [
        (_bad(num_draft=0), ValueError, r"num_draft should be a positive int: but got 0"),
        (_bad(max_new_tokens=2.0), ValueError, r"max_new_tokens should be a positive int"),
        (_bad(prompt_tokens=np.ones((3,), np.int32)), ValueError,
         r"prompt_tokens shape should be \(B, P\)"),
        (_bad(prompt_tokens=np.ones((2, 3), np.float32)), ValueError,
         r"prompt_tokens dtype should be an integer"),
        (_bad(prompt_mask=np.ones((2, 4), bool)), ValueError,
         r"mask shape should be \(B, T\)=\(2, 3\)"),
        (_bad(max_new_tokens=30), ValueError,
         r"target_caches max_len should be at least P \+ \(M - 1\)\(k \+ 1\) = 3 \+ 29 \* 3 = 90: "
         r"but got S=40"),
        (_bad(draft_step_fn=None), TypeError,
         r"draft_step_fn should be callable: but got NoneType"),
        # The prompt rules of generate: ids within the vocabulary, a real token in every row.
        (_bad(prompt_tokens=np.array([[1, 2, 3], [4, 5, 98]], np.int32)), ValueError,
         r"prompt_tokens should be ids in \[0, V\)=\[0, 98\): but got 98 at row 1, column 2"),
        (_bad(prompt_mask=np.array([[1, 1, 1], [0, 0, 0]], bool)), ValueError,
         r"prompt_mask should mark at least one real token in every row: but rows \[1\]"),
        (_bad(target_caches={"k": np.zeros((2, 40, 1, 8))}), TypeError,
         r"target_caches should be a KVCache or a pytree whose leaves are all in KVCaches"),
    ])
def test_bad_arguments_raise(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_different_vocabularies_raise():
  params, config, _ = _model()
  small = RANDOM._replace(vocab_size=50)
  with pytest.raises(
      ValueError, match=r"the target's vocabulary size should be the draft's, "
      r"V=50: but got 98"):
    speculative.speculative_generate(transformer.step_fn(config), params,
                                     transformer.init_caches(config, 1, 12),
                                     transformer.step_fn(small),
                                     transformer.init_params(jax.random.key(0), small),
                                     transformer.init_caches(small, 1, 12), np.ones((1, 3),
                                                                                    np.int32),
                                     np.ones((1, 3), bool), max_new_tokens=4, num_draft=2)


@pytest.mark.slow
def test_main_prints_the_text_the_acceptance_rate_and_the_speed_up():
  prompt = "def f("
  run = subprocess.run([
      sys.executable, "examples/speculative.py", f"--prompt={prompt}", f"--max_new_tokens={M}",
      "--num_draft=2", "--repeats=1"
  ], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert lines[-1] == "identical to the target alone: True", run.stdout
  assert lines[-3].startswith("draft: 1 of 4 layers, k = 2 | rounds "), run.stdout
  assert "acceptance rate " in lines[-3]
  assert lines[-2].startswith("speculative: ") and "tokens/s | target alone: " in lines[-2]
  assert lines[-2].endswith("x") and "speed-up " in lines[-2]
  text = "\n".join(lines[:-4])
  vocab = _model()[2]
  tokens, _ = charlm.encode_batch(vocab, [prompt])
  params, config, _ = _model()
  caches = transformer.init_caches(config, 1, tokens.shape[1] + M - 1)
  greedy = generation.generate(transformer.step_fn(config), params, caches, tokens,
                               np.ones(tokens.shape, bool), max_new_tokens=M,
                               sampler=sampling.Sampler(), key=jax.random.key(0)).tokens
  assert text == prompt + vocab.decode(np.asarray(greedy)[0])
