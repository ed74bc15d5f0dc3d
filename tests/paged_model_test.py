"""The model-level step over a paged cache: `transformer.paged_step` against the dense `step`.

Every sequence of a ragged step (prefill chunks beside decode tokens,
padding rows at the end, slots in any order) must get the logits the dense
model gives that sequence alone; greedy decoding through one compiled
paged step must give `kvattn.generate`'s tokens; the step must update the
stack of layers' pages in place.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn import paged
from kvattn.models import transformer
from tests import compiles

TOL = dict(rtol=1e-4, atol=1e-4)

CONFIGS = {
    "llama": transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                                num_kv_heads=2, head_dim=8, d_ff=64, rope_base=10_000.0,
                                tie_embeddings=False, activation="silu", use_bias=False,
                                norm="rms_norm", gated_mlp=True),
    # Qwen3 / Gemma-like, without windows: qk-norm, pre and post norms, softcaps.
    "gemma": transformer.Config(vocab_size=64, num_layers=3, d_model=32, num_heads=4,
                                num_kv_heads=1, head_dim=16, d_ff=64, rope_base=10_000.0,
                                activation="gelu_tanh", use_bias=False, norm="rms_norm",
                                gated_mlp=True, norm_placement="pre_post", embed_scale=32**0.5,
                                attn_scale=0.2, attn_softcap=50.0, final_softcap=30.0,
                                qk_norm="head"),
    # GPT-2-like: learned positions, LayerNorm, biases.
    "gpt2": transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                               head_dim=8, d_ff=64, max_positions=32, activation="gelu_tanh",
                               use_bias=True, norm="layer_norm"),
}

# Static sizes of every step: tokens per step, sequences per step.
TT, B = 12, 3


@functools.lru_cache(maxsize=None)
def jitted(config):
  step = jax.jit(functools.partial(transformer.paged_step, config=config), donate_argnums=1)
  return step, jax.jit(paged.reserve)


def params_for(config):
  return transformer.init_params(jax.random.key(1), config)


def ragged_step(config, params, caches, entries):
  """One paged step of `entries` [(slot, tokens)], padded to TT rows and B sequences.

  Returns (per-entry logits [len(tokens), V] as numpy, all logits, caches).
  """
  step, reserve = jitted(config)
  slots = np.zeros((B,), np.int32)
  cu = np.zeros((B + 1,), np.int32)
  tokens = np.zeros((TT,), np.int32)
  for i, (slot, toks) in enumerate(entries):
    slots[i] = slot
    tokens[cu[i]:cu[i] + len(toks)] = toks
    cu[i + 1] = cu[i] + len(toks)
  cu[len(entries) + 1:] = cu[len(entries)]
  counts = np.diff(cu).astype(np.int32)
  caches, fits = reserve(caches, jnp.asarray(slots), jnp.asarray(counts), len(entries))
  assert np.asarray(fits)[:len(entries)].all()
  logits, caches = step(params, caches, jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cu),
                        len(entries))
  logits = np.asarray(logits)
  return [logits[cu[i]:cu[i + 1]] for i in range(len(entries))], logits, caches


def dense_alone(config, params, chunks):
  """Logits of one sequence fed chunk by chunk through `step` on dense caches."""
  caches = transformer.init_caches(config, 1, 32)
  out = []
  for chunk in chunks:
    logits, caches = transformer.step(params, caches, jnp.asarray([chunk], jnp.int32), None,
                                      config=config)
    out.append(np.asarray(logits[0]))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "unstacked"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_mix_matches_dense_step_per_sequence(name, unstacked):
  """Per-layer params (`transformer.unstack_layers`, run unrolled) give the same logits."""
  config = CONFIGS[name]
  dense_params = params_for(config)
  params = transformer.unstack_layers(dense_params) if unstacked else dense_params
  caches = transformer.init_paged_caches(config, num_pages=24, page_size=2, max_seqs=4,
                                         pages_per_seq=8)
  # Steps of (slot, tokens): two prefills; a prefill chunk of slot 0 beside
  # decode tokens of 3 and 1, with a padding row; decodes in another order.
  schedule = [
      [(3, [5, 9, 2]), (1, [7, 7])],
      [(0, [1, 2, 3, 4, 5, 6]), (3, [11]), (1, [12])],
      [(1, [13]), (0, [14, 15]), (3, [16])],
  ]
  got = {}
  for entries in schedule:
    per_entry, logits, caches = ragged_step(config, params, caches, entries)
    used = sum(len(t) for _, t in entries)
    np.testing.assert_array_equal(logits[used:], 0.0)  # Padding rows.
    for (slot, _), out in zip(entries, per_entry):
      got.setdefault(slot, []).append(out)
  np.testing.assert_array_equal(np.asarray(caches.lengths), [8, 4, 0, 5])
  for slot in got:
    chunks = [t for entries in schedule for s, t in entries if s == slot]
    for want, out in zip(dense_alone(config, dense_params, chunks), got[slot]):
      np.testing.assert_allclose(out, want, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_decoding_matches_generate_with_one_compilation(name):
  config = CONFIGS[name]
  params = params_for(config)
  prompts = {0: [3, 1, 4, 1, 5], 2: [9, 2], 1: [6, 5, 3, 5]}
  new = 4
  want = {}
  for slot, prompt in prompts.items():
    caches = transformer.init_caches(config, 1, 16)
    out = kvattn.generate(transformer.step_fn(config), params, caches,
                          jnp.asarray([prompt], jnp.int32), max_new_tokens=new)
    want[slot] = np.asarray(out.tokens[0]).tolist()
  caches = transformer.init_paged_caches(config, num_pages=16, page_size=3, max_seqs=3,
                                         pages_per_seq=4)
  got = {slot: [] for slot in prompts}
  entries = list(prompts.items())
  with compiles.compilations("paged_step") as compiled:
    for _ in range(new):
      per_entry, _, caches = ragged_step(config, params, caches, entries)
      entries = []
      for (slot, _), logits in zip(prompts.items(), per_entry):
        token = int(np.argmax(logits[-1]))
        got[slot].append(token)
        entries.append((slot, [token]))
  assert got == want
  assert len(compiled) == 1, compiled  # The prefill step and every decode step.


@pytest.mark.slow
def test_fork_on_the_stack_copies_every_layer_and_decodes_alike():
  config = CONFIGS["gemma"]
  params = params_for(config)
  caches = transformer.init_paged_caches(config, num_pages=12, page_size=4, max_seqs=3,
                                         pages_per_seq=3)
  _, _, caches = ragged_step(config, params, caches, [(0, [1, 2, 3, 4, 5, 6])])  # 1.5 pages.
  caches, ok = paged.fork(caches, 0, 2)
  assert bool(ok)
  table = np.asarray(caches.page_table)
  assert table[2, 0] == table[0, 0] and table[2, 1] != table[0, 1]  # Shared full, copied partial.
  for name in ("k_pages", "v_pages"):
    pages = np.asarray(getattr(caches, name))
    np.testing.assert_array_equal(pages[:, table[2, 1]], pages[:, table[0, 1]])
  (a, b), _, caches = ragged_step(config, params, caches, [(0, [7]), (2, [7])])
  np.testing.assert_allclose(a, b, **TOL)
  (a, b), _, caches = ragged_step(config, params, caches, [(0, [8]), (2, [9])])
  want = dense_alone(config, params, [[1, 2, 3, 4, 5, 6], [7], [9]])[-1]
  np.testing.assert_allclose(b, want, **TOL)
  caches = paged.release(caches, jnp.asarray([True, False, True]))
  assert int(paged.pages_in_use(caches)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("num_tokens", [1, 16], ids=["decode", "prefill"])
def test_paged_step_updates_the_stack_in_place(kind, num_tokens):
  config = CONFIGS["llama"]
  dtype, quantized = {
      "float32": (jnp.float32, False),
      "bfloat16": (jnp.bfloat16, False),
      "int8": (jnp.float32, True)
  }[kind]
  params = jax.eval_shape(functools.partial(transformer.init_params, config=config),
                          jax.random.key(0))
  step = jax.jit(functools.partial(transformer.paged_step, config=config), donate_argnums=1)
  temps = {}
  for num_pages in (64, 1024):
    caches = transformer.init_paged_caches(config, num_pages, 16, 4, 16, dtype=dtype,
                                           quantized=quantized)
    stats = step.lower(params, caches, jnp.zeros((num_tokens * 2,), jnp.int32),
                       jnp.arange(2, dtype=jnp.int32),
                       jnp.asarray([0, num_tokens, 2 * num_tokens], jnp.int32),
                       2).compile().memory_analysis()
    size = sum(x.nbytes for x in jax.tree.leaves(caches))
    assert stats.alias_size_in_bytes >= size - 64, (kind, num_pages)
    temps[num_pages] = stats.temp_size_in_bytes
  assert temps[1024] <= 1.1 * temps[64] + (1 << 20), temps


def test_refuses_what_the_paged_path_cannot_run():
  base = CONFIGS["llama"]
  scaling = kvattn.rope.Scaling("longrope", 2.0, original_max_positions=4, short_factor=(1.0,) * 4,
                                long_factor=(2.0,) * 4)
  for config, match in ((base._replace(window_pattern=(4, None)), "window_pattern"),
                        (base._replace(rope_scaling=scaling), "longrope")):
    with pytest.raises(ValueError, match=match):
      transformer.init_paged_caches(config, 8, 2, 2, 4)
    caches = paged.init_paged_cache(8, 2, 2, 4, base.num_kv_heads, base.head_dim,
                                    num_layers=base.num_layers)
    with pytest.raises(ValueError, match=match):
      transformer.paged_step({}, caches, jnp.zeros((2,), jnp.int32), jnp.zeros((1,), jnp.int32),
                             jnp.asarray([0, 2], jnp.int32), 1, config=config)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_logits_at_returns_the_rows_asked_for(name):
  """`logits_at` gives the full step's rows (repeats allowed), zeros at padding rows."""
  config = CONFIGS[name]
  params = params_for(config)
  entries = [(2, [5, 9, 2, 7]), (0, [4]), (1, [8, 8])]
  caches = transformer.init_paged_caches(config, 16, 2, 3, 4)
  _, full, caches_full = ragged_step(config, params, caches, entries)
  caches = transformer.init_paged_caches(config, 16, 2, 3, 4)
  slots = jnp.asarray([2, 0, 1], jnp.int32)
  cu = jnp.asarray([0, 4, 5, 7], jnp.int32)
  tokens = jnp.asarray([5, 9, 2, 7, 4, 8, 8, 0, 0, 0, 0, 0], jnp.int32)
  caches, _ = paged.reserve(caches, slots, jnp.diff(cu), 3)
  at = jnp.asarray([3, 4, 6, 6, 0, 10], jnp.int32)  # Last rows, a repeat, a first, a padding row.
  logits, caches = transformer.paged_step(params, caches, tokens, slots, cu, 3, config=config,
                                          logits_at=at)
  assert logits.shape == (6, config.vocab_size)
  np.testing.assert_allclose(np.asarray(logits), full[np.asarray(at)], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(caches.lengths), np.asarray(caches_full.lengths))
  with pytest.raises(ValueError, match="logits_at"):
    transformer.paged_step(params, caches, tokens, slots, cu, 3, config=config, logits_at=jnp.zeros(
        (2, 2), jnp.int32))


def test_refuses_bad_tokens_and_caches():
  config = CONFIGS["llama"]
  caches = transformer.init_paged_caches(config, 8, 2, 2, 4)
  meta = (jnp.zeros((1,), jnp.int32), jnp.asarray([0, 2], jnp.int32), 1)
  with pytest.raises(ValueError, match=r"tokens should be int with shape \(TT,\)"):
    transformer.paged_step({}, caches, jnp.zeros((1, 2), jnp.int32), *meta, config=config)
  one = paged.init_paged_cache(8, 2, 2, 4, config.num_kv_heads, config.head_dim)
  with pytest.raises(ValueError, match="init_paged_caches' stack"):
    transformer.paged_step({}, one, jnp.zeros((2,), jnp.int32), *meta, config=config)


def test_attention_refuses_a_stack_without_a_layer_view():
  stack = paged.init_paged_cache(8, 2, 2, 4, 2, 8, num_layers=3)
  assert stack.k_pages.shape == (3, 8, 2, 2, 8) and stack.page_table.shape == (2, 4)
  q, kv = jnp.zeros((2, 4, 8)), jnp.zeros((2, 2, 8))
  meta = (jnp.zeros((1,), jnp.int32), jnp.asarray([0, 2], jnp.int32), 1)
  with pytest.raises(ValueError, match="layer_view"):
    paged.paged_attention(q, kv, kv, stack, *meta)
  view = paged.layer_view(stack, 1)
  stack, _ = paged.reserve(stack, meta[0], jnp.asarray([2], jnp.int32))
  view = paged.layer_view(stack, 1)
  k = jnp.ones((2, 2, 8))
  _, view = paged.paged_attention(q, k, k, view, *meta)
  pages = np.asarray(paged.stack_of(view).k_pages)
  assert pages[1].any() and not pages[0].any() and not pages[2].any()  # Layer 1's only.
