"""Tests of cached_attention (kvattn/attention.py), every implementation, against the oracles.

The oracles are the float64 reference (tests/reference.py) and
`jax.nn.dot_product_attention` over the full sequence. Each implementation in
`kvattn.attention.BACKENDS` is driven directly, with small block sizes,
so that every path runs: block sizes that do and do not divide T and S, a cache index that is
not a multiple of the block, ragged rows, GQA/MQA, both the matmul path
(T * G > 8) and the fused path of a decode step, and prefix-LM static or
traced. The layer tests (tests/layer_test.py) cover the default blocks.
"""

import functools
import re

from hypothesis import example, given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

import kvattn
from tests import reference

B, N, H = 3, 4, 16
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 kernel vs float64 reference.

# The Pallas GPU kernels run in the interpreter on CPU: slow there.
IMPLEMENTATIONS = [
    pytest.param(name, marks=pytest.mark.slow) if name == "pallas_gpu" else name
    for name in sorted(kvattn.attention.BACKENDS)
]


@functools.lru_cache(maxsize=None)
def _kernel(block_q, block_kv, traced_prefix_lm=False, implementation="xla"):
  """The kernel, jitted once per block sizes; prefix_lm static unless traced_prefix_lm."""
  kernel = functools.partial(kvattn.cached_attention, block_q=block_q, block_kv=block_kv,
                             implementation=implementation)
  return jax.jit(kernel, static_argnames=() if traced_prefix_lm else ("prefix_lm",))


def random_qkv(seed, total, num_kv_heads, batch=B, num_heads=N):
  """Random float32 q [B, total, N, H], k and v [B, total, K, H] (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, total, num_heads, H), np.float32)
  k = rng.standard_normal((batch, total, num_kv_heads, H), np.float32)
  v = rng.standard_normal((batch, total, num_kv_heads, H), np.float32)
  return q, k, v


def run_kernel(q, k, v, mask, sizes, max_len, *, block_q, block_kv, prefix_lm=False, cache=None,
               implementation="xla", dtype="float32"):
  """Feeds the tokens in calls of `sizes` tokens each; returns (o, chunk_ids, cache)."""
  if cache is None:
    cache = reference.new_cache(B, max_len, k.shape[2], H, dtype)
  kernel = _kernel(block_q, block_kv, not isinstance(prefix_lm, bool), implementation)
  outs, ids, lo = [], [], 0
  for c, size in enumerate(sizes):
    hi = lo + size
    o, cache = kernel(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache, mask[:, lo:hi],
                      prefix_lm=prefix_lm)
    outs.append(o)
    ids += [c] * size
    lo = hi
  return np.concatenate(outs, axis=1), np.array(ids), cache


reference_attention = reference.attention_by_rows
three_row_mask = reference.three_row_mask

# Calls of 8 tokens at index 0 and 8, then decode steps at 16 and 17: blocks of
# 8 are aligned to the index, blocks of 5 never. T * G spans the matmul path
# (T * G > 8) and the path of a decode step.
SIZES = [8, 8, 1, 1]


# (block_q, block_kv): dividing T=8 and S=24; dividing neither; larger than both.
# The reference takes the stored keys and values, so the tolerance is the
# kernel's own rounding: float32 throughout, except the Pallas kernel's
# matmuls in a 16-bit cache's dtype.
def tolerance(implementation, dtype):
  if implementation == "pallas_gpu" and dtype in ("bfloat16", "float16"):
    return dict(rtol=3e-2, atol=3e-2)
  return TOL


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("block_q, block_kv, num_kv_heads", [(4, 8, N), (3, 5, 2), (128, 256, 2),
                                                             (3, 5, 1)])
@pytest.mark.slow
def test_chunks_and_decode_match_reference(block_q, block_kv, num_kv_heads, dtype, implementation):
  total = sum(SIZES)
  q, k, v = random_qkv(num_kv_heads, total, num_kv_heads)
  mask = three_row_mask(total)
  got, ids, cache = run_kernel(q, k, v, mask, SIZES, 24, block_q=block_q, block_kv=block_kv,
                               implementation=implementation, dtype=dtype)
  want = reference_attention(q, reference.stored(cache, "k", total),
                             reference.stored(cache, "v", total), mask, ids)
  np.testing.assert_allclose(got, want, **tolerance(implementation, dtype))
  assert int(cache.index) == total and not bool(cache.overflow)
  np.testing.assert_array_equal(cache.lengths, np.sum(mask, axis=1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_scale_and_softcap_match_reference(dtype, implementation):
  """A logit scale and a soft cap (Gemma 2), on the matmul and decode paths, int8 included."""
  total = sum(SIZES)
  q, k, v = random_qkv(11, total, 2)
  q = 4.0 * q  # Logits past the cap: tanh bends them.
  mask = three_row_mask(total)
  cache = reference.new_cache(B, 24, 2, H, dtype)
  call = jax.jit(
      functools.partial(kvattn.cached_attention, block_q=3, block_kv=5, scale=0.2, softcap=1.5,
                        implementation=implementation))
  outs, ids, lo = [], [], 0
  for c, size in enumerate(SIZES):
    o, cache = call(q[:, lo:lo + size], k[:, lo:lo + size], v[:, lo:lo + size], cache,
                    mask[:, lo:lo + size])
    outs.append(o)
    ids += [c] * size
    lo += size
  stored = [reference.stored(cache, name, total) for name in ("k", "v")]
  want = reference_attention(q, *stored, mask, np.array(ids), scale=0.2, softcap=1.5)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, **tolerance(implementation, dtype))
  plain = reference_attention(q, *stored, mask, np.array(ids))
  assert np.max(np.abs(want - plain)) > 0.1


@pytest.mark.slow
def test_block_sizes_do_not_change_the_result():
  q, k, v = random_qkv(2, sum(SIZES), 2)
  mask = three_row_mask(sum(SIZES))
  small, _, small_cache = run_kernel(q, k, v, mask, SIZES, 24, block_q=3, block_kv=5)
  large, _, large_cache = run_kernel(q, k, v, mask, SIZES, 24, block_q=128, block_kv=256)
  np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, small_cache, large_cache)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("prefix_lm", [True, np.bool_(True), np.bool_(False)])
@pytest.mark.slow
def test_prefix_lm_chunks_match_reference(prefix_lm, implementation):
  # T=9 spans three query blocks of 4: a traced flag goes through lax.cond.
  sizes = [7, 9]
  total = sum(sizes)
  q, k, v = random_qkv(5, total, 2)
  mask = three_row_mask(total)
  got, ids, _ = run_kernel(q, k, v, mask, sizes, 20, block_q=4, block_kv=3, prefix_lm=prefix_lm,
                           implementation=implementation)
  want = reference_attention(q, k, v, mask, ids, prefix_lm=bool(prefix_lm))
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_blocks_past_the_index_are_never_read(implementation):
  """NaN in every block past the filled ones cannot reach the output."""
  q, k, v = random_qkv(7, 6, 2)
  mask = np.ones((B, 6), bool)
  _, _, cache = run_kernel(q, k, v, mask, [5], 16, block_q=4, block_kv=4,
                           implementation=implementation)
  # Slots [0, 5) are filled: blocks [0, 4) and [4, 8) are read, [8, 16) never.
  k_poisoned, v_poisoned = np.array(cache.k), np.array(cache.v)
  k_poisoned[:, 8:] = v_poisoned[:, 8:] = np.nan
  poisoned = cache._replace(k=jnp.asarray(k_poisoned), v=jnp.asarray(v_poisoned))
  got, _, _ = run_kernel(q[:, 5:], k[:, 5:], v[:, 5:], mask[:, 5:], [1], 16, block_q=4, block_kv=4,
                         cache=poisoned, implementation=implementation)
  want, _, _ = run_kernel(q[:, 5:], k[:, 5:], v[:, 5:], mask[:, 5:], [1], 16, block_q=4, block_kv=4,
                          cache=cache, implementation=implementation)
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_overflow_writes_nothing_but_still_attends(implementation):
  q, k, v = random_qkv(8, 10, 2)
  mask = three_row_mask(10)
  _, _, full = run_kernel(q, k, v, mask, [6], 8, block_q=4, block_kv=3,
                          implementation=implementation)
  before = jax.tree.map(np.array, full)
  got, _, after = run_kernel(q[:, 6:], k[:, 6:], v[:, 6:], mask[:, 6:], [4], 8, block_q=4,
                             block_kv=3, cache=full, implementation=implementation)
  assert bool(after.overflow)
  before = before._replace(overflow=np.array(True))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))
  # The output is still computed, over the cache and the chunk itself.
  want = reference_attention(q, k, v, mask, np.array([0] * 6 + [1] * 4))
  np.testing.assert_allclose(got, want[:, 6:], **TOL)


@pytest.mark.parametrize("quantized", [False, True])
def test_sharded_cache_is_read_block_by_block_without_collectives(quantized):
  """Batch over "data", heads over "model": every block stays on its devices."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices("cpu"))
  cache = kvattn.init_cache(4, 40, 4, H, quantized=quantized)  # Five blocks of 8.
  heads, rows, scalar = PartitionSpec("data", None, "model",
                                      None), PartitionSpec("data", None), PartitionSpec()
  fields = dict(k=heads, v=heads, valid=rows, lengths=PartitionSpec("data"), index=scalar,
                overflow=scalar)
  if quantized:
    fields.update(k_scale=PartitionSpec("data", None, "model"),
                  v_scale=PartitionSpec("data", None, "model"))
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), kvattn.KVCache(**fields),
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
  qkv = NamedSharding(mesh, heads)
  step = jax.jit(functools.partial(kvattn.cached_attention,
                                   block_kv=8), in_shardings=(qkv, qkv, qkv, shardings),
                 out_shardings=(qkv, shardings), donate_argnums=3)
  q = jnp.zeros((4, 1, 8, H))
  hlo = step.lower(q, q[:, :, :4], q[:, :, :4], cache).compile().as_text()
  assert not re.findall(r"all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce", hlo)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=0), r"block_q should be a positive int: but got 0"),
    (dict(block_kv=2.0), r"block_kv should be a positive int: but got 2.0"),
    (dict(implementation="cudnn"), r"implementation should be None or one of \[.*'xla'.*\]: "
     r"but got 'cudnn'"),
])
def test_bad_options_raise(kwargs, match):
  q, k, v = random_qkv(9, 2, 2)
  with pytest.raises(ValueError, match=match):
    kvattn.cached_attention(q, k, v, kvattn.init_cache(B, 4, 2, H), **kwargs)


# --- Edges, drawn: block sizes 1..8, capacities that do and do not divide by
# them, exact fills, overflow, the clamped last block ---------------------------


@st.composite
def edge_scenarios(draw):
  max_len = draw(st.integers(1, 10))
  sizes = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=4))
  total = sum(sizes)
  return dict(
      max_len=max_len,
      sizes=sizes,
      block_q=draw(st.integers(1, 8)),
      block_kv=draw(st.integers(1, 8)),
      num_kv_heads=draw(st.sampled_from([N, 2, 1])),
      prefix_lm=draw(st.booleans()),
      mask=np.array(draw(st.lists(st.booleans(), min_size=B * total, max_size=B * total)),
                    bool).reshape(B, total),
      seed=draw(st.integers(0, 2**16)),
      poison=draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38])),
  )


def poisoned(x, mask, value):
  """x [B, T, ...] with `value` at every padding position."""
  x = np.array(x)
  x[~mask] = value
  return x


def check_edges(sc, implementation):
  total = sum(sc["sizes"])
  q, k, v = random_qkv(sc["seed"], total, sc["num_kv_heads"])
  got, _, cache = run_kernel(q, k, v, sc["mask"], sc["sizes"], sc["max_len"], block_q=sc["block_q"],
                             block_kv=sc["block_kv"], prefix_lm=sc["prefix_lm"],
                             implementation=implementation)
  want, written, overflowed = reference.attention_by_calls(q, k, v, sc["mask"], sc["sizes"],
                                                           sc["max_len"], sc["prefix_lm"])
  np.testing.assert_allclose(got, want, **TOL)
  assert int(cache.index) == written and bool(cache.overflow) == overflowed
  np.testing.assert_array_equal(cache.lengths, sc["mask"][:, :written].sum(1))
  np.testing.assert_array_equal(cache.valid[:, :written], sc["mask"][:, :written])
  np.testing.assert_array_equal(cache.k[:, :written],
                                np.where(sc["mask"][:, :written, None, None], k[:, :written],
                                         0.0))  # Padding is stored as 0.
  assert not np.any(cache.valid[:, written:])

  # Padding never reaches a real token: garbage at padding positions of q, k
  # and v, and in every slot not yet written, changes no real output.
  value, real = sc["poison"], sc["mask"]
  bad = [poisoned(x, real, value) for x in (q, k, v)]
  empty = kvattn.init_cache(B, sc["max_len"], sc["num_kv_heads"], H)
  garbage = jnp.full(empty.k.shape, value, jnp.float32)
  empty = empty._replace(k=garbage, v=garbage + 0.0)
  dirty, _, _ = run_kernel(*bad, real, sc["sizes"], sc["max_len"], block_q=sc["block_q"],
                           block_kv=sc["block_kv"], prefix_lm=sc["prefix_lm"], cache=empty,
                           implementation=implementation)
  assert np.all(np.isfinite(dirty[real]))
  np.testing.assert_allclose(dirty[real], got[real], rtol=1e-6, atol=1e-6)


# An exact fill, then an overflow; a capacity the blocks do not divide.
_EDGE_EXAMPLES = [
    dict(max_len=7, sizes=[3, 4, 1], block_q=2, block_kv=3, num_kv_heads=2, prefix_lm=False,
         mask=np.ones((B, 8), bool), seed=1, poison=np.nan),
    dict(max_len=10, sizes=[9, 1], block_q=4, block_kv=4, num_kv_heads=1, prefix_lm=True,
         mask=three_row_mask(10), seed=2, poison=np.inf),
]


@settings(max_examples=60, deadline=None)
@given(edge_scenarios())
@example(_EDGE_EXAMPLES[0])
@example(_EDGE_EXAMPLES[1])
@pytest.mark.slow
def test_edges_match_reference_xla(sc):
  check_edges(sc, "xla")


@settings(max_examples=8, deadline=None)
@given(edge_scenarios())
@example(_EDGE_EXAMPLES[0])
@pytest.mark.slow
def test_edges_match_reference_pallas_gpu(sc):
  check_edges(sc, "pallas_gpu")


# --- Default blocks, against jax.nn.dot_product_attention --------------------


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("split", [[10], [3, 1, 5, 1]], ids=["one_pass", "chunks"])
def test_chunks_equal_jax_dot_product_attention(num_heads, num_kv_heads, split):
  q, k, v = random_qkv(0, 10, num_kv_heads, batch=2, num_heads=num_heads)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  cache = kvattn.init_cache(2, 16, num_kv_heads, H)
  call, outs, lo = jax.jit(kvattn.cached_attention), [], 0
  for size in split:
    o, cache = call(q[:, lo:lo + size], k[:, lo:lo + size], v[:, lo:lo + size], cache)
    outs.append(o)
    lo += size
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.k[:, :10], k)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_query_that_sees_nothing_gives_zeros(implementation):
  q, k, v = random_qkv(2, 3, 2, batch=1, num_heads=2)
  o, cache = kvattn.cached_attention(q, k, v, kvattn.init_cache(1, 4, 2, H), jnp.zeros(
      (1, 3), bool), implementation=implementation)
  np.testing.assert_array_equal(o, 0.0)
  assert int(cache.index) == 3 and not np.any(cache.valid)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_logits_stay_finite(implementation):
  q, k, v = random_qkv(3, 4, 2, batch=1, num_heads=2)
  o, _ = kvattn.cached_attention(1e4 * q, 1e4 * k, v, kvattn.init_cache(1, 4, 2, H),
                                 implementation=implementation)
  assert np.all(np.isfinite(o))


@pytest.mark.parametrize("shapes, match", [
    (((1, 2, 4, 6), (1, 2, 2, H), (1, 2, 2, H)),
     r"q shape should be \(B, T, N, H\)=\(1, None, None, 16\): but got \(1, 2, 4, 6\)"),
    (((1, 2, 4, H), (1, 3, 2, H),
      (1, 2, 2, H)), r"k shape should be \(B, T, K, H\)=\(1, 2, 2, 16\): but got \(1, 3, 2, 16\)"),
    (((1, 2, 4, H), (1, 2, 2, H),
      (1, 2, 1, H)), r"v shape should be \(B, T, K, H\)=\(1, 2, 2, 16\)"),
    (((1, 2, 3, H), (1, 2, 2, H),
      (1, 2, 2, H)), r"query heads N=3 should be a multiple of the kv heads K=2"),
    (((1, 0, 4, H), (1, 0, 2, H), (1, 0, 2, H)), r"q shape should be \(B, T, N, H\) with T >= 1"),
    (((1, 5, 4, H), (1, 5, 2, H),
      (1, 5, 2, H)), r"q has T=5 new tokens, more than the cache's max_len S=4"),
    (((1, 2, 4 * H), (1, 2, 2, H), (1, 2, 2, H)),
     r"q shape should be \(B, T, N, H\)=\(1, None, None, 16\): but got \(1, 2, 64\)"),
])
def test_bad_shapes_raise(shapes, match):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    kvattn.cached_attention(q, k, v, kvattn.init_cache(1, 4, 2, H))


# --- The dispatcher: one table of backends, one place that decides ------------


def _spy_backend(calls, unsupported=None, **record):
  """A backend that runs the XLA kernels and records which entry point ran."""
  from kvattn.kernels import Backend, xla

  def attend(*args, **kwargs):
    calls.append("attend")
    return xla.attend(*args, **kwargs)

  def attend_ring(*args, **kwargs):
    calls.append("attend_ring")
    return xla.attend_ring(*args, **kwargs)

  return Backend("spy", attend, attend_ring, unsupported=unsupported or (lambda h, s: None),
                 **record)


@pytest.mark.parametrize("window", [None, 3])
def test_platform_default_runs_and_falls_back_to_xla(monkeypatch, window):
  q, k, v = random_qkv(5, 4, 2)
  cache = kvattn.init_cache(B, 8, 2, H, window=window)
  want, _ = kvattn.cached_attention(q, k, v, cache, implementation="xla")
  calls = []
  monkeypatch.setitem(kvattn.attention.BACKENDS, "spy", _spy_backend(calls, platforms=("cpu",)))
  monkeypatch.setitem(kvattn.attention.DEFAULTS, "cpu", "spy")
  o, _ = kvattn.cached_attention(q, k, v, cache)
  assert calls == ["attend" if window is None else "attend_ring"]
  np.testing.assert_array_equal(o, want)
  calls.clear()  # A default that cannot take the shapes: XLA runs instead, silently.
  monkeypatch.setitem(kvattn.attention.BACKENDS, "spy",
                      _spy_backend(calls, platforms=("cpu",), unsupported=lambda h, s: "too small"))
  o, _ = kvattn.cached_attention(q, k, v, cache)
  assert calls == []
  np.testing.assert_array_equal(o, want)


def test_named_backend_that_cannot_run_raises(monkeypatch):
  q, k, v = random_qkv(6, 4, 2)
  cache = kvattn.init_cache(B, 8, 2, H)
  monkeypatch.setitem(kvattn.attention.BACKENDS, "spy", _spy_backend([], platforms=("tpu",)))
  with pytest.raises(ValueError, match=r"implementation='spy' cannot run on cpu: it compiles "
                     r"for tpu"):
    kvattn.cached_attention(q, k, v, cache, implementation="spy")
  # Named, it never falls back: a platform it neither compiles for nor
  # interprets on, or shapes its compiled kernel cannot take, raise.
  monkeypatch.setattr(kvattn.attention, "current_platform", lambda: "tpu")
  with pytest.raises(
      ValueError, match=r"'pallas_gpu' cannot run on tpu: it compiles for cuda "
      r"and runs interpreted on cpu"):
    kvattn.cached_attention(q, k, v, cache, implementation="pallas_gpu")
  monkeypatch.setattr(kvattn.attention, "current_platform", lambda: "cuda")
  q8, k8, v8 = (x[..., :8] for x in (q, k, v))
  with pytest.raises(
      ValueError, match=r"'pallas_gpu' cannot run on cuda: head dimension H=8 "
      r"is not a power of two >= 16"):
    kvattn.cached_attention(q8, k8, v8, kvattn.init_cache(B, 8, 2, 8), implementation="pallas_gpu")


def test_named_backend_interprets_only_where_its_record_says(monkeypatch):
  """Interpreted on CPU by its record; without CPU there, naming it on CPU raises."""
  import dataclasses
  q, k, v = random_qkv(7, 4, 2)
  cache = kvattn.init_cache(B, 8, 2, H)
  want, _ = kvattn.cached_attention(q, k, v, cache, implementation="xla")
  o, _ = kvattn.cached_attention(q, k, v, cache, implementation="pallas_gpu")
  np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
  compiled_only = dataclasses.replace(kvattn.attention.BACKENDS["pallas_gpu"],
                                      interpret_platforms=())
  monkeypatch.setitem(kvattn.attention.BACKENDS, "pallas_gpu", compiled_only)
  with pytest.raises(ValueError, match=r"cannot run on cpu: it compiles for cuda$"):
    kvattn.cached_attention(q, k, v, cache, implementation="pallas_gpu")
