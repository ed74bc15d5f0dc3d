"""A minimal pre-LayerNorm decoder LM written as plain functions over kvattn.

Layer params are stacked on a leading axis and the layers run under
`lax.scan`; so are the caches: one `kvattn.KVCache` pytree whose leaves have a
leading L axis, each layer reading and returning its own slice. `step` is the
cached forward that `kvattn.generate` drives; `forward` is the same model
without a cache (for training, and as the oracle for cached decoding).

Shape legend:
  B: batch size
  T: number of tokens in this call
  S: cache capacity (max_len)
  L: number of layers
  V: vocabulary size
  W: number of learned positions (max_positions)
  DM: model width
  F: MLP hidden width
  N: number of query heads
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import kvattn

Params = dict[str, Any]

_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new".
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


class Config(NamedTuple):
  """Static model configuration (hashable, so it can be a static jit argument).

  Fields:
    vocab_size: V.
    num_layers: L.
    d_model: DM.
    num_heads: N.
    num_kv_heads: K (N must be a multiple of K).
    head_dim: H.
    d_ff: F.
    max_positions: W learned position embeddings; 0 for none.
    rope_base: None for no RoPE; else the RoPE base.
    tie_embeddings: unembed with the token embedding's transpose.
    activation: one of "gelu_tanh", "gelu", "relu".
    use_bias: biases in attention, MLP.
    norm_eps: LayerNorm epsilon.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  max_positions: int = 0
  rope_base: float | None = None
  tie_embeddings: bool = True
  activation: str = "gelu_tanh"
  use_bias: bool = True
  norm_eps: float = 1e-5


# Jitted: run eagerly, the many small init ops would each compile on their own.
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: jax.Array, config: Config, dtype=jnp.float32) -> Params:
  """Returns random params: embeddings N(0, 0.02), kernels LeCun normal, zero biases.

  Layout (leading L on every layer leaf):
    embed [V, DM]; pos_embed [W, DM] if W; unembed [DM, V] if untied;
    ln_f {scale, bias} [DM];
    layers: ln1, ln2 {scale, bias} [L, DM]; attn (kvattn params) wq [L, DM, N, H],
      wk/wv [L, DM, K, H], wo [L, N, H, DM], biases bq [L, N, H], bk/bv [L, K, H],
      bo [L, DM]; mlp w_in [L, DM, F], b_in [L, F], w_out [L, F, DM], b_out [L, DM].
  """
  if config.activation not in _ACTIVATIONS:
    raise ValueError(
        f"config.activation should be one of {sorted(_ACTIVATIONS)}: but got "
        f"{config.activation!r}")
  c = config
  k_embed, k_pos, k_out, k_layers = jax.random.split(key, 4)

  def normal(rng, shape, std):
    return (jax.random.normal(rng, shape, jnp.float32) * std).astype(dtype)

  def layer(rng):
    k_attn, k_in, k_mlp_out = jax.random.split(rng, 3)
    attn = kvattn.init_params(k_attn, c.d_model, c.num_heads, num_kv_heads=c.num_kv_heads,
                              head_dim=c.head_dim, use_bias=c.use_bias, dtype=dtype)
    mlp = {"w_in": normal(k_in, (c.d_model, c.d_ff), c.d_model ** -0.5),
           "w_out": normal(k_mlp_out, (c.d_ff, c.d_model), c.d_ff ** -0.5)}
    if c.use_bias:
      mlp.update(b_in=jnp.zeros((c.d_ff,), dtype), b_out=jnp.zeros((c.d_model,), dtype))
    return {"ln1": _init_layer_norm(c.d_model, dtype), "attn": attn,
            "ln2": _init_layer_norm(c.d_model, dtype), "mlp": mlp}

  params = {
      "embed": normal(k_embed, (c.vocab_size, c.d_model), 0.02),
      "layers": jax.vmap(layer)(jax.random.split(k_layers, c.num_layers)),
      "ln_f": _init_layer_norm(c.d_model, dtype),
  }
  if c.max_positions:
    params["pos_embed"] = normal(k_pos, (c.max_positions, c.d_model), 0.02)
  if not c.tie_embeddings:
    params["unembed"] = normal(k_out, (c.d_model, c.vocab_size), c.d_model ** -0.5)
  return params


@functools.partial(jax.jit, static_argnames=("config", "batch", "max_len", "dtype"))
def init_caches(config: Config, batch: int, max_len: int,
                dtype=jnp.float32) -> kvattn.KVCache:
  """Returns one `KVCache` for all layers: every leaf has a leading L axis.

  k, v are `[L, B, S, K, H]`, valid `[L, B, S]`, lengths `[L, B]`, index and
  overflow `[L]`.
  """
  one = kvattn.init_cache(batch, max_len, config.num_kv_heads, config.head_dim, dtype)
  return jax.tree.map(lambda a: jnp.stack([a] * config.num_layers), one)


def step(params: Params, caches: kvattn.KVCache, tokens: jax.Array,
         mask: jax.Array | None, *, config: Config) -> tuple[jax.Array, kvattn.KVCache]:
  """Runs T new tokens through the model with caches: the `step_fn` of `kvattn.generate`.

  Args:
    params: see `init_params`.
    caches: from `init_caches` (leading L axis).
    tokens: int `[B, T]` token ids (any id at padding).
    mask: bool `[B, T]`, True for real tokens (padding anywhere); None: all real.
    config: the static `Config`.

  Returns:
    `(logits [B, T, V] float32, new caches)`; logits are zeros at padding.
  """
  b, t = _check_tokens(tokens, mask)
  layer0 = jax.tree.map(lambda a: a[0], caches)
  positions = kvattn.token_positions(layer0, mask, num_tokens=t)  # [B, T]
  h = _embed(params, tokens, positions, config)

  def body(h, layer):
    p, cache = layer
    a, cache = kvattn.prefill(p["attn"], cache, _layer_norm(p["ln1"], h, config.norm_eps), mask,
                              rope_base=config.rope_base)
    h = h + a
    return h + _mlp(p["mlp"], _layer_norm(p["ln2"], h, config.norm_eps), config), cache

  h, caches = lax.scan(body, h, (params["layers"], caches))
  logits = _unembed(params, h, config)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, 0.0)
  return logits, caches


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def step_fn(config: Config):
  """Returns `step` with its config bound; the same object per config, so jit caches hit."""
  return functools.partial(step, config=config)


def forward(params: Params, tokens: jax.Array, mask: jax.Array | None = None, *,
            config: Config) -> jax.Array:
  """The model over whole sequences, without a cache: logits `[B, T, V]` float32.

  Causal attention written directly (it does not use kvattn), skipping padding;
  positions count real tokens only, as `kvattn.token_positions` does. Logits
  are zeros at padding.
  """
  b, t = _check_tokens(tokens, mask)
  real = jnp.ones((b, t), jnp.bool_) if mask is None else mask
  m = real.astype(jnp.int32)
  positions = jnp.cumsum(m, axis=1) - m
  allowed = (kvattn.masks.causal_mask(t, t)[None]
             & real[:, :, None] & real[:, None, :])  # [B, T, T]
  h = _embed(params, tokens, positions, config)

  def body(h, p):
    a = _full_attention(p["attn"], _layer_norm(p["ln1"], h, config.norm_eps), positions, allowed,
                        config)
    h = h + a
    return h + _mlp(p["mlp"], _layer_norm(p["ln2"], h, config.norm_eps), config), None

  h, _ = lax.scan(body, h, params["layers"])
  return jnp.where(real[:, :, None], _unembed(params, h, config), 0.0)


def _full_attention(p, x, positions, allowed, config):
  """Plain causal attention over x [B, T, DM]: the uncached route."""
  q = jnp.einsum("BTD,DNH->BTNH", x, p["wq"])
  k = jnp.einsum("BTD,DKH->BTKH", x, p["wk"])
  v = jnp.einsum("BTD,DKH->BTKH", x, p["wv"])
  if "bq" in p:
    q, k, v = q + p["bq"][None, None], k + p["bk"][None, None], v + p["bv"][None, None]
  if config.rope_base is not None:
    q = kvattn.rope.apply_rope(q, positions, config.rope_base)
    k = kvattn.rope.apply_rope(k, positions, config.rope_base)
  g = config.num_heads // config.num_kv_heads
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits * config.head_dim ** -0.5
  logits = jnp.where(allowed[:, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("BNTS,BSNH->BTNH", probs, v.astype(jnp.float32)).astype(x.dtype)
  out = jnp.einsum("BTNH,NHD->BTD", o, p["wo"])
  return out + p["bo"][None, None] if "bo" in p else out


def _check_tokens(tokens, mask) -> tuple[int, int]:
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens should be int with shape (B, T): but got {shape} "
                     f"{getattr(tokens, 'dtype', None)}")
  if mask is not None and (getattr(mask, "shape", None) != shape or mask.dtype != jnp.bool_):
    raise ValueError(f"mask should be bool with shape (B, T)={shape}: but got "
                     f"{getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)}")
  return shape


def _init_layer_norm(d_model, dtype):
  return {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}


def _layer_norm(p, x, eps):
  """LayerNorm over DM, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * lax.rsqrt(var + eps)
  return (y * p["scale"][None, None] + p["bias"][None, None]).astype(x.dtype)


def _mlp(p, x, config):
  h = jnp.einsum("BTD,DF->BTF", x, p["w_in"])
  if "b_in" in p:
    h = h + p["b_in"][None, None]
  h = _ACTIVATIONS[config.activation](h)
  out = jnp.einsum("BTF,FD->BTD", h, p["w_out"])
  return out + p["b_out"][None, None] if "b_out" in p else out


def _embed(params, tokens, positions, config):
  h = jnp.take(params["embed"], tokens, axis=0)
  if config.max_positions:
    # Past the last learned position the last one is reused (jnp.take would clamp too).
    pos = jnp.clip(positions, 0, config.max_positions - 1)
    h = h + jnp.take(params["pos_embed"], pos, axis=0)
  return h


def _unembed(params, h, config):
  h = _layer_norm(params["ln_f"], h, config.norm_eps).astype(jnp.float32)
  if config.tie_embeddings:
    return jnp.einsum("BTD,VD->BTV", h, params["embed"].astype(jnp.float32))
  return jnp.einsum("BTD,DV->BTV", h, params["unembed"].astype(jnp.float32))
