"""Sharded prefill and decoding on 8 fake CPU devices: jit shardings, shard_map, pmap.

Each route runs a ragged GQA batch through prefill and 10 decode steps and
must equal the single-device run within 1e-5; under `jax.jit` the cache keeps
its sharding through every call, and the compiled decode step moves no cache
bytes between devices.

Shape legend:
  B: batch size
  T: prompt length
  S: cache capacity (max_len)
  DM: model width
  N: query heads
  K: kv heads
  H: head dimension
  D: devices of the pmap
"""

import inspect
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

import kvattn
from kvattn import sharding

B, T, S, DM, N, H = 4, 6, 24, 32, 8, 8
DECODE_STEPS = 10
ROPE = 10_000.0
TOL = dict(rtol=1e-5, atol=1e-5)


def _mesh():
  return sharding.make_mesh("data:2,model:4", devices=jax.devices("cpu"))


def _inputs(num_kv_heads):
  """Params (no biases), x [B, T + 10, DM] and a ragged prompt mask [B, T], as numpy.

  numpy draws, not jax.random: no random-number kernels to compile.
  """
  rng = np.random.default_rng(num_kv_heads)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  k = num_kv_heads
  params = {
      "wq": normal(DM, N, H) * DM**-0.5,
      "wk": normal(DM, k, H) * DM**-0.5,
      "wv": normal(DM, k, H) * DM**-0.5,
      "wo": normal(N, H, DM) * (N * H)**-0.5
  }
  x = normal(B, T + DECODE_STEPS, DM)
  # Ragged rows: left padding, right padding, a one-token prompt, a full one.
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]],
                  np.bool_)
  return params, x, mask


def _prefill(params, cache, x, mask):
  return kvattn.prefill(params, cache, x, mask, rope_base=ROPE)


def _decode(params, cache, x):
  return kvattn.decode_step(params, cache, x, rope_base=ROPE)


def _run(prefill, decode, params, cache, x, mask, after_each=lambda cache: None):
  """Prefill of T tokens then DECODE_STEPS decode steps; returns (out [B, T + 10, DM], cache)."""
  out, cache = prefill(params, cache, x[:, :T], mask)
  after_each(cache)
  outs = [out]
  for t in range(T, T + DECODE_STEPS):
    out, cache = decode(params, cache, x[:, t:t + 1])
    after_each(cache)
    outs.append(out)
  return np.concatenate(outs, axis=1), cache


_REFERENCE = {}


def _reference(num_kv_heads):
  """The single-device run (jitted, unsharded), computed once per K."""
  if num_kv_heads not in _REFERENCE:
    params, x, mask = _inputs(num_kv_heads)
    device = jax.devices("cpu")[0]
    params, x, mask = jax.device_put((params, x, mask), device)
    cache = jax.device_put(kvattn.init_cache(B, S, num_kv_heads, H), device)
    _REFERENCE[num_kv_heads] = _run(jax.jit(_prefill), jax.jit(_decode), params, cache, x, mask)
  return _REFERENCE[num_kv_heads]


def _jitted(mesh, params, cache):
  """prefill and decode_step under jax.jit with in/out shardings, donating the cache."""
  p_shard = sharding.params_shardings(params, mesh)
  c_shard = sharding.cache_shardings(cache, mesh)
  x_shard = NamedSharding(mesh, PartitionSpec("data", None, None))
  m_shard = NamedSharding(mesh, PartitionSpec("data", None))
  prefill = jax.jit(_prefill, in_shardings=(p_shard, c_shard, x_shard, m_shard),
                    out_shardings=(x_shard, c_shard), donate_argnums=1)
  decode = jax.jit(_decode, in_shardings=(p_shard, c_shard, x_shard),
                   out_shardings=(x_shard, c_shard), donate_argnums=1)
  return prefill, decode, p_shard, c_shard


# --- Rules and specs -------------------------------------------------------------


def test_cache_specs_split_batch_over_data_and_kv_heads_over_model():
  specs = sharding.cache_specs(kvattn.init_cache(B, S, 4, H), _mesh())
  assert specs.k == PartitionSpec("data", None, "model", None)
  assert specs.v == PartitionSpec("data", None, "model", None)
  assert specs.valid == PartitionSpec("data", None)
  assert specs.lengths == PartitionSpec("data")
  assert specs.index == PartitionSpec() and specs.overflow == PartitionSpec()


@pytest.mark.parametrize("num_kv_heads", [1, 2], ids=["mqa", "small_gqa"])
def test_uneven_kv_heads_are_replicated_over_model(num_kv_heads):
  mesh = _mesh()
  specs = sharding.cache_specs(kvattn.init_cache(B, S, num_kv_heads, H), mesh)
  assert specs.k == PartitionSpec("data", None, None, None)
  params, _, _ = _inputs(num_kv_heads)
  p_specs = sharding.params_specs(params, mesh)
  assert p_specs["wk"] == p_specs["wv"] == PartitionSpec(None, None, None)
  assert p_specs["wq"] == PartitionSpec(None, "model", None)  # Query heads stay split.
  assert p_specs["wo"] == PartitionSpec("model", None, None)


def test_stacked_caches_and_params_get_a_leading_layers_axis():
  mesh = _mesh()
  cache = jax.eval_shape(
      lambda: jax.tree.map(lambda a: jnp.stack([a] * 3), kvattn.init_cache(B, S, 4, H)))
  specs = sharding.cache_specs(cache, mesh)
  assert specs.k == PartitionSpec(None, "data", None, "model", None)
  assert specs.index == PartitionSpec(None)
  params = jax.eval_shape(lambda: jax.vmap(lambda k: kvattn.init_params(
      k, DM, N, num_kv_heads=4, head_dim=H, use_bias=True))(jax.random.split(jax.random.key(0), 3)))
  p_specs = sharding.params_specs(params, mesh)
  assert p_specs["wq"] == PartitionSpec(None, None, "model", None)
  assert p_specs["bk"] == PartitionSpec(None, "model", None)
  assert p_specs["bo"] == PartitionSpec(None, None)


@pytest.mark.skipif("k_scale" not in kvattn.KVCache._fields,
                    reason="this KVCache has no int8 scale fields")
def test_int8_scales_are_sharded_like_the_cache():
  shape = lambda dtype, *dims: jax.ShapeDtypeStruct(dims, dtype)
  cache = kvattn.KVCache(k=shape(jnp.int8, B, S, 4, H), v=shape(jnp.int8, B, S, 4,
                                                                H), valid=shape(jnp.bool_, B, S),
                         lengths=shape(jnp.int32,
                                       B), index=shape(jnp.int32), overflow=shape(jnp.bool_),
                         k_scale=shape(jnp.float32, B, S, 4), v_scale=shape(jnp.float32, B, S, 4))
  specs = sharding.cache_specs(cache, _mesh())
  assert specs.k_scale == specs.v_scale == PartitionSpec("data", None, "model")
  unquantised = sharding.cache_specs(kvattn.init_cache(B, S, 4, H), _mesh())
  assert unquantised.k_scale is None and unquantised.v_scale is None


def test_logical_to_mesh_axes_raises_on_collisions_and_unknown_axes():
  assert sharding.logical_to_mesh_axes(
      ("batch", None, "kv_heads")) == PartitionSpec("data", None, "model")
  with pytest.raises(ValueError, match="uses a mesh axis twice"):
    sharding.logical_to_mesh_axes(("heads", "kv_heads"))
  with pytest.raises(ValueError, match="uses a mesh axis twice"):
    sharding.logical_to_mesh_axes(("batch", "embed"),
                                  rules=(("batch", ("data", "model")), ("embed", "model")))
  with pytest.raises(ValueError, match="'vocab' has no rule"):
    sharding.logical_to_mesh_axes(("vocab",))
  with pytest.raises(ValueError, match="'batch' is named twice"):
    sharding.logical_to_mesh_axes(("batch",), rules=(("batch", "data"), ("batch", None)))


def test_dimensions_that_do_not_divide_raise():
  mesh = _mesh()
  with pytest.raises(
      ValueError, match=r"cache.k dimension 0 \(batch\) has size 3, which "
      r"should divide by mesh axes \('data',\) of size 2"):
    sharding.cache_specs(kvattn.init_cache(3, S, 4, H), mesh)
  params = {"wq": jax.ShapeDtypeStruct((DM, 6, H), jnp.float32)}
  with pytest.raises(ValueError, match=r"params\['wq'\] dimension 1 \(heads\) has size 6"):
    sharding.params_specs(params, mesh)
  with pytest.raises(ValueError, match="does not have"):
    sharding.cache_specs(kvattn.init_cache(B, S, 4, H), mesh,
                         rules=(("batch", "replica"),) + sharding.DEFAULT_RULES[1:])


def test_malformed_trees_raise_naming_the_argument():
  mesh = _mesh()
  with pytest.raises(
      TypeError, match="cache should be a KVCache or a pytree whose leaves are "
      "all in KVCaches: but got ndarray"):
    sharding.cache_specs((np.zeros((B, S, 4, H)),), mesh)
  # A pytree of caches (a model's tuple of stacks) gives the same pytree of specs.
  one = kvattn.init_cache(B, S, 4, H)
  ring = kvattn.init_cache(B, S, 4, H, window=4)
  specs = sharding.cache_specs((one, {"local": ring}), mesh)
  assert specs[0] == sharding.cache_specs(one, mesh)
  assert specs[1]["local"] == sharding.cache_specs(ring, mesh) and specs[1]["local"].window == 4
  with pytest.raises(ValueError, match=r"cache.k shape should be \(..., B, S, K, H\)"):
    sharding.cache_specs(kvattn.init_cache(B, S, 4, H)._replace(k=np.zeros((B, S, 4))), mesh)
  with pytest.raises(ValueError, match=r"params has unknown keys \['w_in'\]"):
    sharding.params_specs({"w_in": np.zeros((DM, 4))}, mesh)


# Explicit axes make the output projection's einsum (a sum over split heads)
# demand an out_sharding, which kvattn does not give: refused up front.
def test_explicit_mesh_axes_are_refused():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                       devices=jax.devices("cpu"))
  with pytest.raises(ValueError, match="should be Auto"):
    sharding.cache_specs(kvattn.init_cache(B, S, 4, H), mesh)


def test_make_mesh_parses_axes():
  mesh = sharding.make_mesh("data:2, model:4", devices=jax.devices("cpu"))
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  for bad in ("data=2", "data:2,data:4", "data:0,model:8", "data:x"):
    with pytest.raises(ValueError, match="mesh axes should"):
      sharding.make_mesh(bad, devices=jax.devices("cpu"))
  with pytest.raises(ValueError, match="number of devices 8"):
    sharding.make_mesh("data:2,model:2", devices=jax.devices("cpu"))


# --- jax.jit with shardings ----------------------------------------------------------


# GQA with kv heads split over "model", and with kv heads replicated (K=2 < 4).
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["gqa", "small_gqa_replicated"])
@pytest.mark.slow
def test_jit_sharded_equals_single_device_and_keeps_cache_sharding(num_kv_heads):
  assert len(jax.devices("cpu")) == 8, "tests/conftest.py should give 8 CPU devices"
  want, want_cache = _reference(num_kv_heads)
  mesh = _mesh()
  params, x, mask = _inputs(num_kv_heads)
  cache = kvattn.init_cache(B, S, num_kv_heads, H)
  prefill, decode, p_shard, c_shard = _jitted(mesh, params, cache)
  cache = sharding.put(cache, c_shard)
  first = cache

  def keeps_sharding(new):
    jax.tree.map(_assert_sharding, new, c_shard)

  out, cache = _run(prefill, decode, sharding.put(params, p_shard), cache, x, mask, keeps_sharding)
  assert first.k.is_deleted(), "the cache should be donated"
  np.testing.assert_allclose(out, want, **TOL)
  np.testing.assert_allclose(cache.k, want_cache.k, **TOL)
  np.testing.assert_allclose(cache.v, want_cache.v, **TOL)
  np.testing.assert_array_equal(cache.valid, want_cache.valid)
  np.testing.assert_array_equal(cache.lengths, want_cache.lengths)
  assert int(cache.index) == T + DECODE_STEPS and not bool(cache.overflow)


# "%name = f32[2,1,32]{2,1,0} all-reduce(...": the result's shape and the collective.
_COLLECTIVE = re.compile(
    r"=\s*(\w+\[[\d,]*\])(?:\{[^}]*\})?\s+"
    r"(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(?:-start)?\(")

# The factored mesh: for K=2 kv heads on a 4-way model axis, "model" becomes
# kv:2 x rep:2, kv heads split over "kv" and query heads over both, so each
# device holds just the kv head its query heads use.
_FACTORED_RULES = (("heads", ("kv", "rep")), ("kv_heads", "kv")) + tuple(
    (axis, mesh_axes)
    for axis, mesh_axes in sharding.DEFAULT_RULES if axis not in ("heads", "kv_heads"))

_INT8 = "quantized" in inspect.signature(kvattn.init_cache).parameters


@pytest.mark.parametrize("num_kv_heads,mesh_axes,rules,quantized", [
    pytest.param(4, "data:2,model:4", sharding.DEFAULT_RULES, False, id="gqa"),
    pytest.param(1, "data:2,model:4", sharding.DEFAULT_RULES, False, id="mqa_replicated"),
    pytest.param(2, "data:2,kv:2,rep:2", _FACTORED_RULES, False, id="small_gqa_factored"),
    pytest.param(4, "data:2,model:4", sharding.DEFAULT_RULES, True, id="gqa_int8",
                 marks=pytest.mark.skipif(not _INT8, reason="no int8 caches in this kvattn")),
])
def test_compiled_decode_step_moves_no_cache_bytes(num_kv_heads, mesh_axes, rules, quantized):
  mesh = sharding.make_mesh(mesh_axes, devices=jax.devices("cpu"))
  params, _, _ = _inputs(num_kv_heads)
  cache = kvattn.init_cache(B, S, num_kv_heads, H, **({"quantized": True} if quantized else {}))
  x_shard = NamedSharding(mesh, PartitionSpec("data", None, None))
  c_shard = sharding.cache_shardings(cache, mesh, rules)
  decode = jax.jit(_decode, in_shardings=(sharding.params_shardings(params, mesh,
                                                                    rules), c_shard, x_shard),
                   out_shardings=(x_shard, c_shard), donate_argnums=1)
  hlo = decode.lower(params, cache, np.zeros((B, 1, DM), np.float32)).compile().as_text()
  collectives = _COLLECTIVE.findall(hlo)
  # The output projection's sum over the heads split along "model", on this
  # device's rows of out [B / 2, 1, DM].
  assert ("f32[2,1,32]", "all-reduce") in collectives, collectives
  # Nothing with a sequence axis (S = 24 slots: k, v, their scales, valid, or
  # a block of them) is ever communicated.
  assert not [c for c in collectives if re.search(rf"[\[,]{S}[,\]]", c[0])], collectives
  if num_kv_heads == 4 and not quantized:
    # Plain GQA: that all-reduce is the only collective at all.
    assert collectives == [("f32[2,1,32]", "all-reduce")], collectives


def test_compiled_prefill_moves_no_cache_bytes():
  mesh = _mesh()
  params, x, mask = _inputs(4)
  prefill, _, _, _ = _jitted(mesh, params, kvattn.init_cache(B, S, 4, H))
  hlo = prefill.lower(params, kvattn.init_cache(B, S, 4, H), x[:, :T], mask).compile().as_text()
  assert _COLLECTIVE.findall(hlo) == [("f32[2,6,32]", "all-reduce")]


# --- shard_map -------------------------------------------------------------------------


@pytest.mark.slow
def test_shard_map_per_shard_equals_single_device():
  """Each shard runs kvattn.prefill (so cached_attention) on its rows and heads.

  The per-shard output projection sums over local heads only, so a psum over
  "model" completes it (no output bias here: it would be added once per shard).
  """
  want, want_cache = _reference(4)
  mesh = _mesh()
  params, x, mask = _inputs(4)
  cache = kvattn.init_cache(B, S, 4, H)
  p_spec = sharding.params_specs(params, mesh)
  c_spec = sharding.cache_specs(cache, mesh)
  x_spec, m_spec = PartitionSpec("data", None, None), PartitionSpec("data", None)

  def local(fn):
    def run(*args):
      out, new_cache = fn(*args)
      return jax.lax.psum(out, "model"), new_cache

    return run

  prefill = jax.jit(
      jax.shard_map(local(_prefill), mesh=mesh, in_specs=(p_spec, c_spec, x_spec, m_spec),
                    out_specs=(x_spec, c_spec)), donate_argnums=1)
  decode = jax.jit(
      jax.shard_map(local(_decode), mesh=mesh, in_specs=(p_spec, c_spec, x_spec),
                    out_specs=(x_spec, c_spec)), donate_argnums=1)
  out, cache = _run(prefill, decode, params, cache, x, mask)
  np.testing.assert_allclose(out, want, **TOL)
  np.testing.assert_allclose(cache.k, want_cache.k, **TOL)
  np.testing.assert_array_equal(cache.lengths, want_cache.lengths)
  jax.tree.map(_assert_sharding, cache, sharding.named(c_spec, mesh))


# --- pmap -------------------------------------------------------------------------------


@pytest.mark.slow
def test_pmap_one_cache_shard_per_device_equals_single_device():
  want, want_cache = _reference(4)
  d = 2
  devices = jax.devices("cpu")[:d]
  params, x, mask = _inputs(4)
  # Each device holds B / D rows, and its own cache for them.
  cache = jax.tree.map(lambda a: jnp.stack([a] * d), kvattn.init_cache(B // d, S, 4, H))
  split = lambda a: a.reshape((d, B // d) + a.shape[1:])
  prefill = jax.pmap(_prefill, in_axes=(None, 0, 0, 0), devices=devices, donate_argnums=1)
  decode = jax.pmap(_decode, in_axes=(None, 0, 0), devices=devices, donate_argnums=1)

  out, cache = prefill(params, cache, split(x[:, :T]), split(mask))
  outs = [out]
  for t in range(T, T + DECODE_STEPS):
    out, cache = decode(params, cache, split(x[:, t:t + 1]))
    outs.append(out)
  merge = lambda a: a.reshape((B,) + a.shape[2:])
  np.testing.assert_allclose(merge(np.concatenate(outs, axis=2)), want, **TOL)
  np.testing.assert_allclose(merge(cache.k), want_cache.k, **TOL)
  np.testing.assert_array_equal(merge(cache.lengths), want_cache.lengths)
  assert [s.device for s in cache.k.addressable_shards] == devices
  assert [s.data.shape for s in cache.k.addressable_shards] == [(1, B // d, S, 4, H)] * d


def _assert_sharding(array, expected):
  assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)
