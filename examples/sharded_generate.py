r"""Greedy generation with the example transformer, sharded over a device mesh.

One host, 8 fake CPU devices (a laptop will do):

    python examples/sharded_generate.py --host_devices=8 --mesh=data:2,model:4

Two CPU processes on one machine, 4 devices each, one global 2x4 mesh (run
both; gloo carries the collectives between them):

    python examples/sharded_generate.py --host_devices=4 --mesh=data:2,model:4 \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
    python examples/sharded_generate.py --host_devices=4 --mesh=data:2,model:4 \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1

On a TPU or GPU pod slice, run the same command on every host with
`--distributed` (JAX finds the coordinator itself there) and a mesh that
covers all devices, e.g. `--mesh=data:4,model:8` for 32 chips.

The batch is split over "data", heads and the MLP over "model"; params and
caches are placed by `kvattn.sharding`, and prefill and decode are `jax.jit`
with in/out shardings and a donated cache. The tokens printed are then
checked against the same model run on a single device.

Shape legend:
  B: batch size
  P: padded prompt length
  G: generated tokens per row
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from kvattn import sharding
from kvattn.models import transformer

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# The rules of the transformer's leaves: kvattn's, plus vocabulary and MLP width.
RULES = transformer.RULES

_MESH = flags.DEFINE_string("mesh", "data:2,model:4",
                            "Mesh axes and sizes; they multiply to the number of devices.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", None, "Fake this many CPU devices in this process (sets XLA_FLAGS).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize even without the flags above "
    "(TPU pods, SLURM and Open MPI supply them).")
_BATCH = flags.DEFINE_integer("batch", 4, "B, prompts decoded together (ragged).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 12, "P, padded prompt length.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "G, tokens generated per row.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
_VOCAB = flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the random model and prompts.")
_COMPARE = flags.DEFINE_bool("compare", True, "Also run on one device and compare the tokens.")


def prompts(seed: int, batch: int, prompt_len: int, vocab: int):
  """Left-padded ragged prompts: tokens int32 [B, P], mask bool [B, P] (numpy).

  Drawn with numpy, so every process draws the same ones.
  """
  tokens = np.random.default_rng(seed).integers(1, vocab, (batch, prompt_len), np.int32)
  lengths = np.maximum(prompt_len - 3 * np.arange(batch), 1)
  mask = np.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
  return tokens, mask


def prefill_greedy(params, caches, tokens, mask, *, config):
  """Runs left-padded prompts [B, P]; returns (next token int32 [B, 1], caches)."""
  logits, caches = transformer.step(params, caches, tokens, mask, config=config)
  return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), caches


def decode_greedy(params, caches, token, *, config):
  """Feeds token [B, 1]; returns (next token int32 [B, 1], caches)."""
  logits, caches = transformer.step(params, caches, token, None, config=config)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


def generate(config, key, tokens, mask, max_new_tokens, mesh=None):
  """Greedy tokens int32 [B, G] (numpy) and seconds spent compiling.

  With a mesh, params and caches are created already sharded (jit with
  out_shardings, so every process builds only its own shards) and the two
  steps run with in/out shardings, the caches donated. The tokens come back
  replicated, so that every process can read them. Without a mesh, the same
  functions run on one device.
  """
  b, p = tokens.shape
  init_params = functools.partial(transformer.init_params, config=config)
  init_caches = functools.partial(transformer.init_caches, config, b, p + max_new_tokens - 1)
  prefill = functools.partial(prefill_greedy, config=config)
  decode = functools.partial(decode_greedy, config=config)
  token_shape = jax.ShapeDtypeStruct((b, 1), jnp.int32)
  # jax.jit keyword arguments per function: none on one device.
  kw = {"init_params": {}, "init_caches": {}, "prefill": {}, "decode": {}}
  if mesh is not None:
    params_shape = jax.eval_shape(init_params, key)
    p_shard = sharding.named(
        sharding.tree_specs(params_shape, transformer.params_logical_axes(params_shape), mesh,
                            RULES, name="params"), mesh)
    c_shard = sharding.cache_shardings(jax.eval_shape(init_caches), mesh, RULES)
    rows = NamedSharding(mesh, PartitionSpec("data", None))
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens, mask = sharding.put((tokens, mask), (rows, rows))
    token_shape = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=replicated)
    kw = {
        "init_params": dict(out_shardings=p_shard),
        "init_caches": dict(out_shardings=c_shard),
        "prefill": dict(in_shardings=(p_shard, c_shard, rows, rows),
                        out_shardings=(replicated, c_shard)),
        "decode": dict(in_shardings=(p_shard, c_shard, replicated),
                       out_shardings=(replicated, c_shard))
    }
  params = jax.jit(init_params, **kw["init_params"])(key)
  caches = jax.jit(init_caches, **kw["init_caches"])()
  t0 = time.perf_counter()
  prefill = jax.jit(prefill, donate_argnums=1, **kw["prefill"]).lower(params, caches, tokens,
                                                                      mask).compile()
  decode = jax.jit(decode, donate_argnums=1, **kw["decode"]).lower(params, caches,
                                                                   token_shape).compile()
  compile_s = time.perf_counter() - t0
  token, caches = prefill(params, caches, tokens, mask)
  out = [token]
  for _ in range(max_new_tokens - 1):
    token, caches = decode(params, caches, token)
    out.append(token)
  return np.concatenate([np.asarray(t) for t in out], axis=1), compile_s


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _HOST_DEVICES.value:
    # XLA reads XLA_FLAGS once, when the backend starts (the first device
    # query below), so setting it here is early enough.
    flag = f"--xla_force_host_platform_device_count={_HOST_DEVICES.value}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  if _DISTRIBUTED.value or _COORDINATOR.value:
    # gloo: cross-process collectives for CPU devices (TPU and GPU bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  mesh = sharding.make_mesh(_MESH.value)
  d_model, heads = _D_MODEL.value, _HEADS.value
  config = transformer.Config(vocab_size=_VOCAB.value, num_layers=_LAYERS.value, d_model=d_model,
                              num_heads=heads, num_kv_heads=_KV_HEADS.value,
                              head_dim=d_model // heads, d_ff=4 * d_model, rope_base=10_000.0,
                              use_bias=False)
  key_model = jax.random.key(_SEED.value)
  tokens, mask = prompts(_SEED.value, _BATCH.value, _PROMPT_LEN.value, _VOCAB.value)

  out, compile_s = generate(config, key_model, tokens, mask, _MAX_NEW_TOKENS.value, mesh)
  log = print if jax.process_index() == 0 else (lambda *args: None)
  log(f"mesh {dict(mesh.shape)}: {jax.device_count()} devices, {jax.process_count()} "
      f"process(es); compile {compile_s:.2f} s")
  log(f"generated tokens [B, G] = {out.shape}:")
  for row in out:
    log(" ".join(str(t) for t in row))
  if _COMPARE.value:
    single, _ = generate(config, key_model, tokens, mask, _MAX_NEW_TOKENS.value)
    if not np.array_equal(out, single):
      raise SystemExit(f"process {jax.process_index()}: the sharded tokens differ from the "
                       f"single-device run:\n{single}")
    log("same tokens as the single-device run")


if __name__ == "__main__":
  app.run(main)
