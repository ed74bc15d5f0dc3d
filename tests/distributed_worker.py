r"""One process of the multi-process generation in tests/distributed_test.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/distributed_worker.py \
        --coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=0

Without --coordinator_address it runs alone, on one device: the reference.

Each process joins `jax.distributed` (gloo collectives on CPU), builds one
global data:2 x model:4 mesh over both processes' devices, and runs greedy
generation with a small kvattn decoder, params and caches sharded by
`kvattn.sharding`; then serves a few requests with `kvattn.serving.Engine`
on the same mesh (process 0 takes them, the others `follow`). It prints one
line, `RESULT {"tokens": ..., "logits": ..., "served": ...}`, which must
equal the single-process, single-device run's ("served" on process 0).

Shape legend:
  B: batch size
  P: prompt length
  G: generated tokens
  L: layers
  V: vocabulary size
  DM: model width
  N: query heads
  K: kv heads
  H: head dimension
"""

from __future__ import annotations

import json
import pathlib
import sys

if __name__ == "__main__":  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

import kvattn
from kvattn import serving
from kvattn import sharding
from kvattn.models import transformer

B, PROMPT, GENERATED, L, V, DM, N, K, H = 4, 6, 10, 2, 64, 32, 8, 4, 8
ROPE = 10_000.0


def init_params() -> dict:
  """Random params as numpy, the same in every process.

  embed [V, DM], unembed [DM, V], and attention params stacked on a leading L.
  """
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  return {
      "embed": normal(V, DM),
      "unembed": normal(DM, V) * DM**-0.5,
      "layers": {
          "wq": normal(L, DM, N, H) * DM**-0.5,
          "wk": normal(L, DM, K, H) * DM**-0.5,
          "wv": normal(L, DM, K, H) * DM**-0.5,
          "wo": normal(L, N, H, DM) * (N * H)**-0.5
      },
  }


def prompts() -> tuple[np.ndarray, np.ndarray]:
  """A ragged, left- and right-padded batch: tokens int32 [B, P], mask bool [B, P]."""
  tokens = np.random.default_rng(1).integers(1, V, (B, PROMPT), dtype=np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]],
                  np.bool_)
  return tokens, mask


def _forward(params, caches, tokens, mask):
  """tokens int [B, T] -> (logits [B, T, V] float32, caches); layers under lax.scan."""
  def layer(x, layer_and_cache):
    p, cache = layer_and_cache
    h, cache = kvattn.prefill(p, cache, _rms_norm(x), mask, rope_base=ROPE)
    return x + h, cache

  x, caches = jax.lax.scan(layer, params["embed"][tokens], (params["layers"], caches))
  return jnp.einsum("BTD,DV->BTV", _rms_norm(x), params["unembed"]), caches


def _rms_norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _generate(params, caches, tokens, mask):
  """Prefill, then G - 1 decode steps: (tokens int32 [B, G], last logits [B, V], caches)."""
  last = PROMPT - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # Each row's last real token.
  logits, caches = _forward(params, caches, tokens, mask)
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  out = jnp.zeros((B, GENERATED), jnp.int32).at[:, 0].set(jnp.argmax(logits, -1))

  def step(i, carry):
    out, _, caches = carry
    newest = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
    logits, caches = _forward(params, caches, newest, None)
    return out.at[:, i].set(jnp.argmax(logits[:, 0], -1)), logits[:, 0], caches

  return jax.lax.fori_loop(1, GENERATED, step, (out, logits, caches))


def _init_caches():
  one = kvattn.init_cache(B, PROMPT + GENERATED, K, H)
  return jax.tree.map(lambda a: jnp.stack([a] * L), one)


def generate(mesh: jax.sharding.Mesh | None) -> tuple[np.ndarray, np.ndarray]:
  """Greedy tokens int32 [B, G] and the last step's logits [B, V], as numpy.

  With a mesh, params and caches are placed by `kvattn.sharding` and one
  jitted generation runs over the whole mesh (every process calls this); the
  results come back replicated, so every process can read them. Without one,
  it runs on a single device.
  """
  params = init_params()
  tokens, mask = prompts()
  if mesh is None:
    out, logits, _ = jax.jit(_generate)(params, jax.jit(_init_caches)(), tokens, mask)
    return np.asarray(out), np.asarray(logits)
  caches_shape = jax.eval_shape(_init_caches)
  c_shard = sharding.cache_shardings(caches_shape, mesh)
  p_shard = {
      "embed": NamedSharding(mesh, PartitionSpec()),
      "unembed": NamedSharding(mesh, PartitionSpec()),
      "layers": sharding.params_shardings(params["layers"], mesh)
  }
  rows = NamedSharding(mesh, PartitionSpec("data", None))
  replicated = NamedSharding(mesh, PartitionSpec())
  # The caches are created sharded, from the same description as their specs.
  caches = jax.jit(_init_caches, out_shardings=c_shard)()
  run = jax.jit(_generate, in_shardings=(p_shard, c_shard, rows, rows),
                out_shardings=(replicated, replicated, c_shard), donate_argnums=1)
  out, logits, caches = run(sharding.put(params, p_shard), caches,
                            *sharding.put((tokens, mask), (rows, rows)))
  return np.asarray(out), np.asarray(logits)


def serve(mesh: jax.sharding.Mesh | None) -> list | None:
  """The serving engine on the mesh: process 0 takes the requests, the others follow.

  Returns each request's tokens on process 0 (and alone); None on the others.
  """
  config = transformer.Config(vocab_size=V, num_layers=L, d_model=DM, num_heads=N, num_kv_heads=K,
                              head_dim=H, d_ff=2 * DM, rope_base=ROPE, tie_embeddings=False,
                              activation="silu", use_bias=False, norm="rms_norm", gated_mlp=True)
  params = transformer.init_params(jax.random.key(2), config)
  engine = serving.Engine(
      params, config, serving.EngineConfig(max_seqs=4, max_len=32, page_size=4, token_budget=16),
      mesh=mesh)
  if mesh is not None and jax.process_index() != 0:
    engine.follow(max_steps=1000)
    engine.pool.check_idle()
    return None
  prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8], [4, 6, 2, 6]]
  done = engine.generate(prompts, [
      serving.SamplingParams(max_tokens=6, temperature=0),
      serving.SamplingParams(max_tokens=9, temperature=1.0, seed=5, n=2),
      serving.SamplingParams(max_tokens=4, temperature=0),
      serving.SamplingParams(max_tokens=7, temperature=0.8, top_k=8, seed=11),
  ])
  engine.close()
  engine.pool.check_idle()
  return [c.token_ids for c in done]


_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0; None: one process, one device.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's id.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  mesh = None
  if _COORDINATOR.value is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, initialization_timeout=60)
    mesh = sharding.make_mesh("data:2,model:4")
  tokens, logits = generate(mesh)
  served = serve(mesh)
  print(
      "RESULT " + json.dumps({
          "process_id": jax.process_index(),
          "devices": jax.device_count(),
          "local_devices": jax.local_device_count(),
          "tokens": tokens.tolist(),
          "logits": logits.tolist(),
          "served": served,
      }), flush=True)


if __name__ == "__main__":
  app.run(main)
