r"""Quick start: a random decoder stack, a ragged batch prefilled in one pass, then decoding.

    python examples/quickstart.py --batch=4 --decode_steps=32

Each layer is kvattn attention plus a small MLP; the layers' params and caches
are stacked on a leading axis and run with `lax.scan`. The weights are random,
so the tokens mean nothing: this shows the shapes, the calls and the speed.
"""

import logging
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import kvattn

# jax logs at INFO that it found no TPU, which absl would print as the first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

_BATCH = flags.DEFINE_integer("batch", 4, "Number of prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 24, "Padded prompt length; rows are ragged.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 32, "Tokens to generate per row.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Number of decoder layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads (grouped-query attention).")
_VOCAB = flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")

ROPE_BASE = 10_000.0


def init_model(key, layers, vocab, d_model, heads, kv_heads):
  """Random params: embedding [V, DM] and per-layer params stacked on axis 0."""
  k_embed, k_unembed, k_layers = jax.random.split(key, 3)

  def one_layer(k):
    k_attn, k_in, k_out = jax.random.split(k, 3)
    return {
        "attn": kvattn.init_params(k_attn, d_model, heads, num_kv_heads=kv_heads),
        "mlp_in": jax.random.normal(k_in, (d_model, 4 * d_model)) * d_model**-0.5,
        "mlp_out": jax.random.normal(k_out, (4 * d_model, d_model)) * (4 * d_model)**-0.5,
    }

  return {
      "embed": jax.random.normal(k_embed, (vocab, d_model)),
      "unembed": jax.random.normal(k_unembed, (d_model, vocab)) * d_model**-0.5,
      "layers": jax.vmap(one_layer)(jax.random.split(k_layers, layers)),
  }


def _rms_norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def forward(params, caches, tokens, mask):
  """tokens int [B, T], mask bool [B, T] -> (logits [B, T, V], caches)."""
  def layer(x, layer_and_cache):
    p, cache = layer_and_cache
    h, cache = kvattn.prefill(p["attn"], cache, _rms_norm(x), mask, rope_base=ROPE_BASE)
    x = x + h
    x = x + jax.nn.gelu(_rms_norm(x) @ p["mlp_in"]) @ p["mlp_out"]
    return x, cache

  x = params["embed"][tokens]
  x, caches = jax.lax.scan(layer, x, (params["layers"], caches))
  return _rms_norm(x) @ params["unembed"], caches


def setup(key, batch, prompt_len, max_len, layers, vocab, d_model, heads, kv_heads):
  """Random params, empty stacked caches, and a left-padded ragged batch of prompts."""
  key_model, key_tokens = jax.random.split(key)
  params = init_model(key_model, layers, vocab, d_model, heads, kv_heads)
  one_cache = kvattn.init_cache(batch, max_len, kv_heads, d_model // heads)
  caches = jax.tree.map(lambda a: jnp.stack([a] * layers), one_cache)
  tokens = jax.random.randint(key_tokens, (batch, prompt_len), 0, vocab)
  # Row i has prompt_len - 3 * i real tokens (at least 1), padded on the left.
  lengths = jnp.maximum(prompt_len - 3 * jnp.arange(batch), 1)
  mask = jnp.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
  return params, caches, tokens, mask


def prefill_greedy(params, caches, tokens, mask):
  logits, caches = forward(params, caches, tokens, mask)
  return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), caches


def decode_greedy(params, caches, token):
  logits, caches = forward(params, caches, token, None)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  b, steps = _BATCH.value, _DECODE_STEPS.value
  params, caches, tokens, mask = jax.jit(setup, static_argnums=range(
      1, 9))(jax.random.key(_SEED.value), b, _PROMPT_LEN.value, _PROMPT_LEN.value + steps,
             _LAYERS.value, _VOCAB.value, _D_MODEL.value, _HEADS.value, _KV_HEADS.value)

  # Compile ahead of time so the timings below measure running, not compiling.
  t0 = time.perf_counter()
  prefill = jax.jit(prefill_greedy, donate_argnums=1).lower(params, caches, tokens, mask).compile()
  decode = jax.jit(decode_greedy, donate_argnums=1).lower(params, caches,
                                                          jnp.zeros((b, 1), jnp.int32)).compile()
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  token, caches = prefill(params, caches, tokens, mask)
  token.block_until_ready()
  prefill_s = time.perf_counter() - t0

  generated = [token]
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    token, caches = decode(params, caches, token)
    generated.append(token)
  out = jnp.concatenate(generated, axis=1).block_until_ready()
  decode_s = time.perf_counter() - t0

  real = mask.sum(axis=1)
  print(f"prompt tokens [B, T]       : {tokens.shape}, real per row {real.tolist()}")
  print(f"cache k per layer [B,S,K,H]: {caches.k.shape[1:]} x {caches.k.shape[0]} layers")
  print(f"generated tokens [B, N]    : {out.shape}, cache index {int(caches.index[0])}")
  print(f"overflowed                 : {bool(kvattn.overflowed(caches).any())}")
  print(f"first row                  : {out[0, :16].tolist()}")
  print(f"compile (both functions)   : {compile_s:.2f} s")
  print(f"prefill                    : {prefill_s * 1e3:.1f} ms for {int(real.sum())} real tokens")
  print(f"decode                     : {b * (steps - 1) / decode_s:.0f} tokens/s "
        f"({decode_s / (steps - 1) * 1e3:.2f} ms/step, batch {b})")


if __name__ == "__main__":
  app.run(main)
