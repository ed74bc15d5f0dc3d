"""The serving engine: every request as if it ran alone, whatever else runs.

The reference is the dense path: `kvattn.generate` on `transformer.step`
over a dense cache, one batch of right-padded prompts (each row of it equals
that prompt alone, tests/generation_test.py). Against it, the engine's
greedy tokens must be equal for every request of a mix, whatever the
arrival order, the page size, the token budget (chunked prefill), the
preemptions and the prefix-cache hits; a seeded request draws the same
tokens whatever runs beside it; n forks equal n requests with the seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn.models import charlm
from kvattn.models import transformer
from kvattn.serving import Engine, EngineConfig, SamplingParams
from kvattn.serving import pool as pool_lib
from tests import compiles

# A small random model: GQA, qk-norm, untied unembedding, vocabulary 64.
TINY = transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, d_ff=64, rope_base=10_000.0, tie_embeddings=False,
                          activation="silu", use_bias=False, norm="rms_norm", gated_mlp=True,
                          qk_norm="head")
# GPT-2-like: learned positions (the engine bounds every sequence by them).
LEARNED = transformer.Config(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                             head_dim=8, d_ff=64, max_positions=48, activation="gelu_tanh",
                             use_bias=True, norm="layer_norm")


@functools.lru_cache(maxsize=None)
def model(name):
  if name == "charlm":
    params, config, _ = charlm.load()
    return params, config
  config = {"tiny": TINY, "learned": LEARNED}[name]
  return transformer.init_params(jax.random.key(3), config), config


def reference(name, prompts, max_tokens):
  """Greedy tokens of the dense path, one list of max_tokens per prompt."""
  params, config = model(name)
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    mask[i, :len(p)] = True
  caches = transformer.init_caches(config, len(prompts), width + max_tokens + 64)
  out = kvattn.generate(transformer.step_fn(config), params, caches, jnp.asarray(tokens),
                        jnp.asarray(mask), max_new_tokens=max_tokens)
  return np.asarray(out.tokens).tolist()


def engine_for(name, **sizes):
  params, config = model(name)
  max_len = config.max_positions or 64
  sizes = dict(dict(max_seqs=4, max_len=max_len, page_size=4, token_budget=16), **sizes)
  return Engine(params, config, EngineConfig(**sizes))


def random_prompts(rng, count, vocab, low=1, high=30):
  return [rng.integers(1, vocab, size=rng.integers(low, high + 1)).tolist() for _ in range(count)]


def serve(engine, prompts, params, arrivals):
  """Adds request i before step arrivals[i]; steps until done. Returns {i: tokens}."""
  order = np.argsort(arrivals, kind="stable")
  ids, got, step = {}, {}, 0
  for _ in range(10_000):
    while len(ids) < len(prompts) and arrivals[order[len(ids)]] <= step:
      i = int(order[len(ids)])
      ids[engine.add_request(prompts[i], params[i])] = i
    if len(ids) == len(prompts) and not engine.has_work():
      break
    for out in engine.step():
      got.setdefault((ids[out.request_id], out.index), []).extend(out.token_ids)
    step += 1
  else:
    raise AssertionError("the engine did not finish")
  return got


def check_idle(engine):
  engine.pool.check_idle()
  assert not engine.has_work() and not engine._requests  # pylint: disable=protected-access
  assert len(engine.scheduler.free_slots) == engine.engine_config.max_seqs


# Greedy: every request equals the dense path alone. ---------------------------


@pytest.mark.parametrize("name,page_size,budget", [
    ("tiny", 4, 16),
    ("tiny", 1, 8),
    pytest.param("tiny", 16, 32, marks=pytest.mark.slow),
    pytest.param("charlm", 8, 12, marks=pytest.mark.slow),
    pytest.param("learned", 4, 16, marks=pytest.mark.slow),
])
def test_greedy_tokens_equal_each_request_alone_whatever_the_mix(name, page_size, budget):
  params_, config = model(name)
  rng = np.random.default_rng(page_size + budget)
  prompts = random_prompts(rng, 10, config.vocab_size)
  max_tokens = rng.integers(1, 12, size=len(prompts))
  want = reference(name, prompts, 12)
  arrivals = rng.integers(0, 12, size=len(prompts))
  params = [SamplingParams(max_tokens=int(m), temperature=0) for m in max_tokens]
  engine = engine_for(name, page_size=page_size, token_budget=budget)
  got = serve(engine, prompts, params, arrivals)
  for i, m in enumerate(max_tokens):
    assert got[(i, 0)] == want[i][:m], i
  check_idle(engine)
  assert engine.metrics()["requests_finished"] == len(prompts)


def test_decode_runs_give_the_tokens_of_single_steps():
  """decode_steps > 1 runs several decode steps per call: same tokens, sampled or not, stops too."""
  params_, config = model("tiny")
  rng = np.random.default_rng(12)
  prompts = random_prompts(rng, 6, config.vocab_size)
  params = [
      SamplingParams(max_tokens=int(rng.integers(5, 20)), temperature=float(t), seed=i, top_k=10,
                     stop_token_ids=[int(rng.integers(1, 64))])
      for i, t in enumerate([0, 1, 0.7, 0, 1.3, 1])
  ]
  got = {}
  for steps in (1, 4):
    engine = engine_for("tiny", decode_steps=steps)
    got[steps] = [c.token_ids for c in engine.generate(prompts, params)]
    metrics = engine.metrics()
    check_idle(engine)
    if steps == 4:
      assert metrics["calls"] < metrics["steps"]
  assert got[4] == got[1]


def test_preemption_recomputes_and_loses_nothing():
  """A pool of one sequence's pages: sequences are preempted and finish as if alone."""
  rng = np.random.default_rng(5)
  prompts = random_prompts(rng, 8, TINY.vocab_size, 10, 24)
  want = reference("tiny", prompts, 16)
  engine = engine_for("tiny", num_pages=16, prefix_caching=False)  # 16 pages = 64 tokens.
  params = [SamplingParams(max_tokens=16, temperature=0)] * len(prompts)
  got = serve(engine, prompts, params, [0] * len(prompts))
  assert engine.metrics()["preemptions"] > 0
  for i in range(len(prompts)):
    assert got[(i, 0)] == want[i], i
  check_idle(engine)


def test_prefix_hits_skip_prefill_and_change_no_token():
  rng = np.random.default_rng(6)
  prefix = rng.integers(1, TINY.vocab_size, size=20).tolist()
  prompts = [prefix + rng.integers(1, TINY.vocab_size, size=k).tolist() for k in (1, 3, 4, 7, 9)]
  want = reference("tiny", prompts, 6)
  params = [SamplingParams(max_tokens=6, temperature=0)] * len(prompts)
  runs = {}
  for caching in (True, False):
    engine = engine_for("tiny", prefix_caching=caching)
    # The first request alone, then the others once it has finished.
    got = serve(engine, prompts, params, [0] + [20] * (len(prompts) - 1))
    runs[caching] = engine.metrics()
    for i in range(len(prompts)):
      assert got[(i, 0)] == want[i], (caching, i)
    check_idle(engine)
  # 20 prefix tokens are 5 full pages of 4: each later request skips them.
  hit = (len(prompts) - 1) * 20 / sum(len(p) for p in prompts)
  assert runs[True]["prefix_hit_rate"] == pytest.approx(hit)
  assert runs[False]["prefix_hit_rate"] == 0.0
  assert runs[True]["step_tokens_mean"] * runs[True]["steps"] == pytest.approx(
      runs[False]["step_tokens_mean"] * runs[False]["steps"] - (len(prompts) - 1) * 20)


def test_a_cached_prefix_is_evicted_least_recently_used_first():
  pool = pool_lib.PagePool(4, 2)
  keys = pool_lib.page_keys([1, 2, 3, 4, 5, 6], 2)
  pages = pool.allocate(3)
  for key, page in zip(keys, pages):
    pool.remember(key, page)
  pool.release(pages[2:])  # Released first: evicted first.
  pool.release(pages[:2])
  assert pool.available == 4 and pool.in_use == 0 and pool.cached == 3
  assert pool.allocate(2) == [3, pages[2]]  # The free page, then the oldest cached one.
  assert pool.lookup(keys) == pages[:2] and pool.in_use == 4
  assert pool.allocate(1) is None
  with pytest.raises(RuntimeError, match="leaked"):
    pool.check_idle()


# Sampling: per-request settings, seeds, forks. ---------------------------------


def test_a_seed_draws_the_same_tokens_whatever_else_runs():
  rng = np.random.default_rng(7)
  prompts = random_prompts(rng, 6, TINY.vocab_size)
  sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
  alone = engine_for("tiny").generate([prompts[0]], sampled)[0].token_ids[0]
  others = [SamplingParams(max_tokens=8, temperature=0.7, seed=i, min_p=0.05) for i in range(1, 6)]
  got = serve(engine_for("tiny", page_size=2, token_budget=8), prompts, [sampled] + others,
              [3, 0, 0, 1, 2, 5])
  assert got[(0, 0)] == alone
  assert len(set(map(tuple, (got[(i, 0)] for i in range(6))))) > 1


@pytest.mark.parametrize("prompt_len", [10, 12])  # A partial last page of 4, and full pages.
def test_n_forks_equal_separate_requests_with_their_seeds(prompt_len):
  rng = np.random.default_rng(prompt_len)
  prompt = rng.integers(1, TINY.vocab_size, size=prompt_len).tolist()
  settings = dict(max_tokens=9, temperature=1.0, top_k=30)
  engine = engine_for("tiny")
  forked = engine.generate([prompt], SamplingParams(n=4, seed=40, **settings))[0]
  check_idle(engine)
  separate = engine_for("tiny", prefix_caching=False).generate(
      [prompt] * 4, [SamplingParams(seed=40 + i, **settings) for i in range(4)])
  assert forked.token_ids == [c.token_ids[0] for c in separate]
  assert len(set(map(tuple, forked.token_ids))) > 1  # The seeds differ: so do the outputs.
  # The prompt ran once: its tokens plus each output's tokens but the last.
  steps = engine.metrics()
  assert steps["step_tokens_mean"] * steps["steps"] == pytest.approx(prompt_len + 4 * 8)


def test_logprobs_are_the_models_and_the_top_alternatives_sorted():
  params, config = model("tiny")
  prompt = [5, 9, 2, 7, 11]
  engine = engine_for("tiny")
  out = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
  tokens, logprobs = out.token_ids[0], out.logprobs[0]
  logits = transformer.forward(params, jnp.asarray([prompt + tokens], jnp.int32), config=config)
  want = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)), np.float64)
  for j, lp in enumerate(logprobs):
    row = want[len(prompt) - 1 + j]
    assert lp.token == tokens[j]
    np.testing.assert_allclose(lp.logprob, row[tokens[j]], atol=1e-4)
    assert [t for t, _ in lp.top] == np.argsort(-row, kind="stable")[:3].tolist()
    np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:3], atol=1e-4)
    assert lp.top[0][0] == tokens[j]  # Greedy draws the most likely.
  none = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))[0]
  assert none.logprobs == [None]


def test_stop_tokens_end_a_request_and_eos_unless_ignored():
  params, config = model("tiny")
  prompt = [3, 1, 4, 1, 5]
  greedy = reference("tiny", [prompt], 8)[0]
  stop = greedy[3]
  cut = greedy.index(stop) + 1
  engine = Engine(params, config, EngineConfig(max_seqs=4, max_len=64, page_size=4,
                                               token_budget=16), eos_token_ids=[stop])
  plain, ignored, explicit = engine.generate([prompt] * 3, [
      SamplingParams(max_tokens=8, temperature=0),
      SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop], ignore_eos=True),
  ])
  assert plain.token_ids[0] == greedy[:cut] and plain.finish_reasons == ["stop"]
  assert ignored.token_ids[0] == greedy and ignored.finish_reasons == ["length"]
  assert explicit.token_ids[0] == greedy[:cut] and explicit.finish_reasons == ["stop"]
  check_idle(engine)


def test_abort_frees_the_slot_and_pages_and_touches_no_other_request():
  rng = np.random.default_rng(8)
  prompts = random_prompts(rng, 3, TINY.vocab_size, 8, 20)
  want = reference("tiny", prompts, 20)
  engine = engine_for("tiny")
  ids = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0)) for p in prompts]
  got = {rid: [] for rid in ids}
  for _ in range(4):
    for out in engine.step():
      got[out.request_id].extend(out.token_ids)
  engine.abort(ids[1])
  engine.abort("no-such-request")  # Ignored: it may have finished already.
  outs = engine.step()
  assert [(o.request_id, o.finished, o.finish_reason) for o in outs if o.request_id == ids[1]
         ] == [(ids[1], True, "abort")]
  for out in outs:
    got[out.request_id].extend(out.token_ids)
  for _ in range(100):
    if not engine.has_work():
      break
    for out in engine.step():
      got[out.request_id].extend(out.token_ids)
  assert got[ids[0]] == want[0] and got[ids[2]] == want[2]
  assert got[ids[1]] == want[1][:len(got[ids[1]])]
  check_idle(engine)


def test_aborting_one_output_of_n_leaves_the_others_as_they_were():
  prompt = [7, 3, 9, 1, 4, 4, 2, 8, 5, 6]
  settings = dict(max_tokens=8, temperature=1.0, top_k=30)
  separate = engine_for("tiny").generate(
      [prompt] * 4, [SamplingParams(seed=50 + i, **settings) for i in range(4)])
  # The prompt takes two steps; one decode step per call.
  engine = engine_for("tiny", token_budget=8, decode_steps=1)
  rid = engine.add_request(prompt, SamplingParams(n=4, seed=50, **settings))
  got = {i: [] for i in range(4)}
  reasons = {}

  def step():
    for out in engine.step():
      got[out.index].extend(out.token_ids)
      if out.finished:
        reasons[out.index] = out.finish_reason

  step()  # Half the prompt: nothing forked yet.
  engine.abort(rid, index=0)  # The output that carries the prompt, before the fork.
  engine.abort(rid, index=2)
  step()  # The prompt is done: outputs 1 and 3 draw, 0 and 2 never do.
  step()
  engine.abort(rid, index=3)  # After the fork.
  for _ in range(20):
    step()
  assert reasons == {0: "abort", 2: "abort", 3: "abort", 1: "length"}
  assert got[0] == got[2] == []
  assert got[1] == separate[1].token_ids[0]
  assert got[3] == separate[3].token_ids[0][:len(got[3])] and len(got[3]) == 2
  check_idle(engine)
  with pytest.raises(ValueError, match="index"):
    engine.abort(rid, index="1")


# Compiled shapes, bad input, sizes. ---------------------------------------------


def test_nothing_compiles_after_warmup():
  rng = np.random.default_rng(9)
  engine = engine_for("tiny", max_seqs=4, token_budget=32, page_size=4)
  assert engine.engine_config.buckets == (8, 16, 32)
  prompts = random_prompts(rng, 12, TINY.vocab_size, 1, 60)
  params = [
      SamplingParams(max_tokens=int(m), temperature=float(t), top_k=int(k), top_p=float(p),
                     min_p=float(q), n=int(n), logprobs=int(lp))
      for m, t, k, p, q, n, lp in zip(rng.integers(1, 4, 12), rng.uniform(
          0, 2, 12), rng.integers(0, 64, 12), rng.uniform(0.1, 1, 12), rng.uniform(0, 0.2, 12),
                                      rng.integers(1, 3, 12), rng.integers(0, 6, 12))
  ]
  with compiles.compilations() as compiled:
    serve(engine, prompts, params, rng.integers(0, 6, 12))
  assert compiled == []
  check_idle(engine)


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "prompt"),
    ([[1, 2]], SamplingParams(), "prompt"),
    ([1, 64], SamplingParams(), "prompt ids"),
    ([1, -1], SamplingParams(), "prompt ids"),
    ([1.5, 2], SamplingParams(), "prompt"),
    ([1] * 60, SamplingParams(max_tokens=5), "max_len"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(temperature=float("nan")), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=-2), "top_k"),
    ([1], SamplingParams(min_p=1.5), "min_p"),
    ([1], SamplingParams(stop_token_ids=[64]), "stop_token_ids"),
    ([1], SamplingParams(seed=-1), "seed"),
    ([1], SamplingParams(seed=2**32), "seed"),
    ([1], SamplingParams(n=5), "max_seqs"),
    ([1], SamplingParams(n=0), "n should"),
    ([1], SamplingParams(logprobs=6), "logprobs"),
    ([1], SamplingParams(ignore_eos=1), "ignore_eos"),
])
def test_bad_requests_are_refused_and_change_nothing(prompt, params, match):
  engine = engine_for("tiny")
  with pytest.raises(ValueError, match=match):
    engine.add_request(prompt, params)
  assert not engine.has_work()
  with pytest.raises(TypeError, match="SamplingParams"):
    engine.add_request([1], dict(max_tokens=2))
  rid = engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="x")
  with pytest.raises(ValueError, match="request_id"):
    engine.add_request([1, 2], request_id=rid)


@pytest.mark.parametrize("sizes,match", [
    (dict(max_seqs=0), "max_seqs"),
    (dict(token_budget=2), "token_budget"),
    (dict(num_pages=3), "num_pages"),
    (dict(token_buckets=(8, 4, 16)), "token_buckets"),
    (dict(token_buckets=(8,)), "token_buckets"),
    (dict(max_logprobs=-1), "max_logprobs"),
    (dict(seed=-1), "seed"),
])
def test_bad_engine_sizes_are_refused(sizes, match):
  params, config = model("tiny")
  sizes = dict(dict(max_seqs=4, max_len=64, page_size=4, token_budget=16), **sizes)
  with pytest.raises(ValueError, match=match):
    Engine(params, config, EngineConfig(**sizes), warmup=False)


@pytest.mark.parametrize("eos", [[64], [-1], [1.5]])
def test_bad_eos_ids_are_refused(eos):
  params, config = model("tiny")
  with pytest.raises(ValueError, match="eos_token_ids"):
    Engine(params, config, EngineConfig(max_len=64), eos_token_ids=eos, warmup=False)


def test_learned_positions_bound_max_len():
  params, config = model("learned")
  with pytest.raises(ValueError, match="learned positions"):
    Engine(params, config, EngineConfig(max_len=64), warmup=False)
  with pytest.raises(ValueError, match="window_pattern"):
    Engine(params, config._replace(max_positions=0, rope_base=1e4, window_pattern=(8,)),
           EngineConfig(max_len=32), warmup=False)


# A mesh, and a long soak. ----------------------------------------------------------


def test_on_a_mesh_pages_split_over_kv_heads_and_tokens_are_equal():
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  params, config = model("learned")  # 4 kv heads: one per "model" device.
  mesh = kvattn.sharding.make_mesh({"data": 1, "model": 4}, jax.devices()[:4])
  engine = Engine(params, config, EngineConfig(max_seqs=4, max_len=48, page_size=4,
                                               token_budget=16), mesh=mesh)
  assert engine.caches.k_pages.sharding.spec[3] == "model"
  rng = np.random.default_rng(10)
  prompts = random_prompts(rng, 6, config.vocab_size, 1, 20)
  want = reference("learned", prompts, 8)
  got = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
  assert [c.token_ids[0] for c in got] == want
  assert engine.caches.k_pages.sharding.spec[3] == "model"
  check_idle(engine)


@pytest.mark.slow
def test_soak_of_2000_requests_compiles_nothing_and_leaks_nothing():
  rng = np.random.default_rng(11)
  # Pages for a quarter of the slots at max_len: preemptions happen.
  engine = engine_for("tiny", max_seqs=8, max_len=48, page_size=4, num_pages=24, token_budget=32)
  prefixes = [rng.integers(1, 64, size=12).tolist() for _ in range(4)]
  count = 2000
  prompts = []
  for i in range(count):
    tail = rng.integers(1, 64, size=rng.integers(1, 24)).tolist()
    prompts.append(prefixes[i % 4] + tail if rng.random() < 0.3 else tail)
  params = [
      SamplingParams(max_tokens=int(rng.integers(1, 10)), temperature=float(rng.choice([0, 1])),
                     seed=i, n=int(rng.choice([1, 1, 1, 2])), top_k=int(rng.integers(0, 10)))
      for i in range(count)
  ]
  live = sum(x.nbytes for x in jax.live_arrays())
  with compiles.compilations() as compiled:
    got = serve(engine, prompts, params, np.sort(rng.integers(0, 800, size=count)))
  assert compiled == []
  check_idle(engine)
  assert sum(x.nbytes for x in jax.live_arrays()) <= live
  for i, p in enumerate(params):
    for k in range(p.n):
      assert 1 <= len(got[(i, k)]) <= p.max_tokens
  m = engine.metrics()
  assert m["requests_finished"] == count and m["preemptions"] > 0
  assert m["prefix_hit_rate"] > 0
  # A sample of the greedy requests equals the dense path.
  sample = [i for i, p in enumerate(params) if p.temperature == 0][:16]
  want = reference("tiny", [prompts[i] for i in sample], 9)
  for i, w in zip(sample, want):
    assert got[(i, 0)] == w[:params[i].max_tokens], i
