"""prefill and decode_step under jax.jit with shardings on 8 fake CPU devices.

Batch goes over the "data" mesh axis, heads over "model". Results must equal
the single-device run and the cache must keep its sharding through every call.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

import kvattn

B, T, S, DM, N, K, H = 4, 6, 16, 32, 8, 4, 8


def _shardings(mesh):
  named = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
  cache = kvattn.KVCache(k=named("data", None, "model", None), v=named("data", None, "model", None),
                         valid=named("data",
                                     None), lengths=named("data"), index=named(), overflow=named())
  params = {
      "wq": named(None, "model", None),
      "wk": named(None, "model", None),
      "wv": named(None, "model", None),
      "wo": named("model", None, None)
  }
  return params, cache, named("data", None, None), named("data", None)


@pytest.mark.slow
def test_sharded_prefill_and_decode_equal_single_device():
  assert len(jax.devices("cpu")) == 8, "tests/conftest.py should give 8 CPU devices"
  # Auto axes: the classic pjit style, where XLA's partitioner propagates
  # shardings from the in/out annotations.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices("cpu"))
  p_shard, c_shard, x_shard, m_shard = _shardings(mesh)
  params = kvattn.init_params(jax.random.key(0), DM, N, num_kv_heads=K, head_dim=H)
  x = jax.random.normal(jax.random.key(1), (B, T + 4, DM))
  mask = jnp.arange(T)[None, :] >= jnp.array([0, 2, 5, 1])[:, None]  # Left-padded rows.

  prefill = jax.jit(lambda p, c, x, m: kvattn.prefill(p, c, x, m, rope_base=1e4),
                    in_shardings=(p_shard, c_shard, x_shard, m_shard),
                    out_shardings=(x_shard, c_shard), donate_argnums=1)
  decode = jax.jit(lambda p, c, x: kvattn.decode_step(p, c, x, rope_base=1e4),
                   in_shardings=(p_shard, c_shard, x_shard), out_shardings=(x_shard, c_shard),
                   donate_argnums=1)

  def run(prefill_fn, decode_fn, params, cache):
    out, cache = prefill_fn(params, cache, x[:, :T], mask)
    outs = [out]
    for t in range(T, T + 4):
      out, cache = decode_fn(params, cache, x[:, t:t + 1])
      outs.append(out)
    return jnp.concatenate(outs, 1), cache

  want, want_cache = run(jax.jit(lambda p, c, x, m: kvattn.prefill(p, c, x, m, rope_base=1e4)),
                         jax.jit(lambda p, c, x: kvattn.decode_step(p, c, x, rope_base=1e4)),
                         params, kvattn.init_cache(B, S, K, H))

  sharded_params = jax.device_put(params, p_shard)
  cache = jax.device_put(kvattn.init_cache(B, S, K, H), c_shard)
  out, cache = prefill(sharded_params, cache, x[:, :T], mask)
  jax.tree.map(lambda a, s: _assert_sharding(a, s), cache, c_shard)
  outs = [out]
  for t in range(T, T + 4):
    out, cache = decode(sharded_params, cache, x[:, t:t + 1])
    jax.tree.map(lambda a, s: _assert_sharding(a, s), cache, c_shard)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache.k, want_cache.k, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.valid, want_cache.valid)


def _assert_sharding(array, sharding):
  assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)
