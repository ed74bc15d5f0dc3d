"""A pre-norm decoder LM written as plain functions over kvattn.

One `Config` covers GPT-2 (LayerNorm, GELU MLP, learned positions, biases) and
the Llama family (RMSNorm, SwiGLU, RoPE with Llama 3.1 or linear scaling,
grouped-query attention, optional q/k/v biases as in Qwen2, tied or untied
unembedding); `kvattn.models.gpt2` and `kvattn.models.llama` load their
checkpoints into it.

Layer params are stacked on a leading axis and the layers run under
`lax.scan`; so are the caches: one `kvattn.KVCache` pytree whose leaves have a
leading L axis, carried through the layer loop (`kvattn.scan_layers`) so that
each layer reads and writes its own slots of the stack in place. With
`unstack_layers(params)` the layer params are a tuple of per-layer pytrees
instead and the layers run unrolled (the caches stay stacked): what bfloat16
weights need on CPU (see `unstack_layers`). `step` is the
cached forward that `kvattn.generate` drives; `forward` is the same model
without a cache (for training: reverse-differentiable, attention memory
O(T * block)), through the same projections and attention numerics
(`kvattn.self_attention`). `paged_step` runs a ragged batch (prefill chunks
beside decode tokens) over `init_paged_caches`' stack of paged caches
(`kvattn.paged`), in place as well.

Shape legend:
  B: batch size
  T: number of tokens in this call
  S: cache capacity (max_len)
  L: number of layers
  V: vocabulary size
  MP: number of learned positions (max_positions)
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
from jax.sharding import PartitionSpec

import kvattn
from kvattn._checks import check_heads, check_positive_ints, is_real

Params = dict[str, Any]

_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new".
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

NORMS = ("layer_norm", "rms_norm")
# Where each layer's norms sit: before attention and the MLP ("pre", GPT-2,
# Llama), also on their outputs before the residual add ("pre_post", Gemma 2
# and 3), or only there ("post", OLMo 2).
NORM_PLACEMENTS = ("pre", "pre_post", "post")
QK_NORMS = ("head", "projection")


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
    max_positions: MP learned position embeddings; 0 for none.
    rope_base: None for no RoPE; else the RoPE base.
    tie_embeddings: unembed with the token embedding's transpose.
    activation: one of "gelu_tanh", "gelu", "relu", "silu".
    use_bias: biases in the attention output and the MLP (and in q, k, v
      unless `qkv_bias` says otherwise).
    norm_eps: the norm's epsilon.
    norm: "layer_norm" (scale and bias) or "rms_norm" (scale only).
    gated_mlp: the MLP is `w_out(act(x w_gate) * (x w_in))` (SwiGLU with
      "silu"); else `w_out(act(x w_in))`.
    qkv_bias: biases in q, k, v; None: as `use_bias`.
    rope_scaling: None, or a `kvattn.rope.Scaling` (needs rope_base).
    window_pattern: each layer's sliding window, repeated over the layers:
      layer i's is `window_pattern[i % len(window_pattern)]`, an int W (it
      attends to the last W positions only) or None (global attention).
      Empty: no window. `window_pattern=(W,)` windows every layer (Mistral);
      there is no separate `sliding_window` field. `(W, None)` alternates
      local and global layers (Gemma 2); a longer pattern (Gemma 3) or a
      per-layer tuple of length L (Qwen2) mixes them otherwise. Windowed
      layers get ring caches of W slots (`init_caches`) and the same window
      in `forward`; each run of consecutive layers with one window gets its
      own stacked cache and its own `lax.scan` (`layer_runs`). The property
      `layer_windows` spells out the L windows.
    norm_placement: "pre" (norms ln1, ln2 before attention and the MLP),
      "pre_post" (also post_ln1, post_ln2 on their outputs, before the
      residual add: Gemma 2 and 3) or "post" (only post_ln1, post_ln2: OLMo 2).
    embed_scale: None, or a factor on the token embeddings (Gemma: sqrt(DM),
      rounded to the params' dtype as Gemma does).
    attn_scale: None for 1/sqrt(H), or the attention logits' scale (Gemma 2
      and 3: `query_pre_attn_scalar ** -0.5`).
    attn_softcap: None, or c: attention logits soft-capped to c tanh(x / c)
      (Gemma 2).
    final_softcap: None, or c: output logits soft-capped likewise (Gemma 2).
    qk_norm: None, "head" (RMSNorm of q and k per head before RoPE: Qwen3,
      Gemma 3) or "projection" (over all heads: OLMo 2), with `norm_eps`.
    rotary_dim: None to rotate all H features; R to rotate the first R
      (Phi's `partial_rotary_factor`).
    rope_local_base: None, or the RoPE base of the windowed layers, which
      then take no `rope_scaling` (Gemma 3's local layers); global layers
      keep `rope_base` and `rope_scaling`.
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
  norm: str = "layer_norm"
  gated_mlp: bool = False
  qkv_bias: bool | None = None
  rope_scaling: kvattn.rope.Scaling | None = None
  window_pattern: tuple[int | None, ...] = ()
  norm_placement: str = "pre"
  embed_scale: float | None = None
  attn_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  qk_norm: str | None = None
  rotary_dim: int | None = None
  rope_local_base: float | None = None

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """Each of the L layers' window (None: global attention), from `window_pattern`."""
    pattern = self.window_pattern or (None,)
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))


def check_config(config: Config) -> None:
  """Raises TypeError/ValueError for a config no model can be built from."""
  if not isinstance(config, Config):
    raise TypeError(f"config should be a transformer.Config: but got {type(config).__name__}")
  c = config
  check_positive_ints(vocab_size=c.vocab_size, num_layers=c.num_layers, d_model=c.d_model,
                      num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                      d_ff=c.d_ff)
  check_heads(c.num_heads, c.num_kv_heads)
  if c.activation not in _ACTIVATIONS:
    raise ValueError(f"config.activation should be one of {sorted(_ACTIVATIONS)}: but got "
                     f"{c.activation!r}")
  if c.norm not in NORMS:
    raise ValueError(f"config.norm should be one of {NORMS}: but got {c.norm!r}")
  if c.rope_base is not None:
    kvattn.rope.check_base(c.rope_base, "config.rope_base")
    if c.head_dim % 2:
      raise ValueError(f"config.head_dim should be even with RoPE: but got {c.head_dim}")
  kvattn.rope.check_scaling(c.rope_scaling, "config.rope_scaling")
  if c.rope_scaling is not None and c.rope_base is None:
    raise ValueError("config.rope_scaling needs config.rope_base: but got rope_base=None")
  if not isinstance(c.window_pattern, tuple):
    raise TypeError(f"config.window_pattern should be a tuple of positive ints and Nones "
                    f"(W for every layer: (W,)): but got {c.window_pattern!r}")
  for w in c.window_pattern:
    if w is not None:
      check_positive_ints(**{"config.window_pattern": w})
  if c.norm_placement not in NORM_PLACEMENTS:
    raise ValueError(f"config.norm_placement should be one of {NORM_PLACEMENTS}: but got "
                     f"{c.norm_placement!r}")
  if c.qk_norm is not None and c.qk_norm not in QK_NORMS:
    raise ValueError(f"config.qk_norm should be None or one of {QK_NORMS}: but got "
                     f"{c.qk_norm!r}")
  for name in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap"):
    value = getattr(c, name)
    if value is not None and not (is_real(value) and 0 < value < float("inf")):
      raise ValueError(f"config.{name} should be None or a positive float: but got {value!r}")
  if c.rotary_dim is not None or c.rope_local_base is not None:
    if c.rope_base is None:
      raise ValueError(f"config.rotary_dim and config.rope_local_base need config.rope_base: "
                       f"but got rotary_dim={c.rotary_dim!r}, "
                       f"rope_local_base={c.rope_local_base!r} and rope_base=None")
    kvattn.rope.check_rotary_dim(c.rotary_dim, c.head_dim, "config.rotary_dim")
    if c.rope_local_base is not None:
      kvattn.rope.check_base(c.rope_local_base, "config.rope_local_base")


def layer_runs(config: Config) -> tuple[tuple[int | None, int, int], ...]:
  """Runs of consecutive layers with one window: (window, first layer, end)."""
  windows = config.layer_windows
  runs = []
  for i, w in enumerate(windows):
    if runs and runs[-1][0] == w:
      runs[-1] = (w, runs[-1][1], i + 1)
    else:
      runs.append((w, i, i + 1))
  return tuple(runs)


# The logical axes of the params beyond attention (whose own come from
# kvattn.sharding), by leaf name: "vocab" and "mlp" are this model's own.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "pos_embed": (None, "embed"),
    "unembed": ("embed", "vocab"),
    "scale": ("embed",),
    "bias": ("embed",),
    "w_in": ("embed", "mlp"),
    "b_in": ("mlp",),
    "w_gate": ("embed", "mlp"),
    "b_gate": ("mlp",),
    "w_out": ("mlp", "embed"),
    "b_out": ("embed",),
}

# kvattn.sharding's rules plus this model's axes: the vocabulary replicated,
# the MLP's hidden width split over "model" (as the heads are).
RULES = kvattn.sharding.DEFAULT_RULES + (("vocab", None), ("mlp", "model"))


def params_logical_axes(params: Params) -> Params:
  """The logical axes of every leaf of the params (stacked or per-layer), as PartitionSpecs.

  The same structure as `params`; with `kvattn.sharding.tree_specs(params,
  params_logical_axes(params), mesh, RULES)` they give the params' shardings.
  Stacked layers get a leading "layers" axis; the attention params take
  `kvattn.sharding.params_logical_axes`.
  """
  def axes(path, leaf):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    name = keys[-1]
    if name not in PARAM_AXES:
      raise ValueError(f"params{''.join(f'[{k!r}]' for k in keys)} should be one of the "
                       f"transformer's params {sorted(PARAM_AXES)}: but got {name!r}")
    lead = ("layers",) * (leaf.ndim - len(PARAM_AXES[name]))
    return PartitionSpec(*lead, *PARAM_AXES[name])

  def one_layer(layer):
    out = {k: jax.tree_util.tree_map_with_path(axes, v) for k, v in layer.items() if k != "attn"}
    return {**out, "attn": kvattn.sharding.params_logical_axes(layer["attn"])}

  layers = params["layers"]
  others = {k: v for k, v in params.items() if k != "layers"}
  out = jax.tree_util.tree_map_with_path(axes, others)
  out["layers"] = (tuple(
      one_layer(layer) for layer in layers) if isinstance(layers,
                                                          (list, tuple)) else one_layer(layers))
  return out


def _qkv_bias(config: Config) -> bool:
  return config.use_bias if config.qkv_bias is None else config.qkv_bias


# Jitted: run eagerly, the many small init ops would each compile on their own.
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: jax.Array, config: Config, dtype=jnp.float32) -> Params:
  """Returns random params: embeddings N(0, 0.02), kernels LeCun normal, zero biases.

  Layout (leading L on every layer leaf):
    embed [V, DM]; pos_embed [MP, DM] if MP; unembed [DM, V] if untied;
    ln_f {scale [DM], bias [DM] (layer_norm only)};
    layers: ln1, ln2 {scale, bias} [L, DM] (pre-norms), post_ln1, post_ln2 (post-norms,
      see `norm_placement`); attn (kvattn params) wq [L, DM, N, H],
      wk/wv [L, DM, K, H], wo [L, N, H, DM], biases bq [L, N, H], bk/bv [L, K, H]
      (if qkv biases), bo [L, DM] (if use_bias), q_norm/k_norm [L, H] or
      q_norm_proj [L, N, H]/k_norm_proj [L, K, H] (qk_norm); mlp w_in [L, DM, F],
      w_gate [L, DM, F] (if gated), w_out [L, F, DM], biases b_in, b_gate [L, F],
      b_out [L, DM] (if use_bias).
  """
  check_config(config)
  c = config
  k_embed, k_pos, k_out, k_layers = jax.random.split(key, 4)

  def normal(rng, shape, std):
    return (jax.random.normal(rng, shape, jnp.float32) * std).astype(dtype)

  def layer(rng):
    k_attn, k_in, k_mlp_out, k_gate = jax.random.split(rng, 4)
    attn = kvattn.init_params(k_attn, c.d_model, c.num_heads, num_kv_heads=c.num_kv_heads,
                              head_dim=c.head_dim, use_bias=c.use_bias or _qkv_bias(c),
                              qk_norm=c.qk_norm, dtype=dtype)
    if not _qkv_bias(c):
      attn = {name: a for name, a in attn.items() if name not in ("bq", "bk", "bv")}
    if not c.use_bias:
      attn.pop("bo", None)
    mlp = {
        "w_in": normal(k_in, (c.d_model, c.d_ff), c.d_model**-0.5),
        "w_out": normal(k_mlp_out, (c.d_ff, c.d_model), c.d_ff**-0.5)
    }
    if c.gated_mlp:
      mlp["w_gate"] = normal(k_gate, (c.d_model, c.d_ff), c.d_model**-0.5)
    if c.use_bias:
      mlp.update(b_in=jnp.zeros((c.d_ff,), dtype), b_out=jnp.zeros((c.d_model,), dtype))
      if c.gated_mlp:
        mlp["b_gate"] = jnp.zeros((c.d_ff,), dtype)
    return {"attn": attn, "mlp": mlp, **{name: _init_norm(c, dtype) for name in _layer_norms(c)}}

  params = {
      "embed": normal(k_embed, (c.vocab_size, c.d_model), 0.02),
      "layers": jax.vmap(layer)(jax.random.split(k_layers, c.num_layers)),
      "ln_f": _init_norm(c, dtype),
  }
  if c.max_positions:
    params["pos_embed"] = normal(k_pos, (c.max_positions, c.d_model), 0.02)
  if not c.tie_embeddings:
    params["unembed"] = normal(k_out, (c.d_model, c.vocab_size), c.d_model**-0.5)
  return params


@functools.partial(
    jax.jit, static_argnames=("config", "batch", "max_len", "dtype", "rewind_room", "quantized"))
def init_caches(config: Config, batch: int, max_len: int, dtype=jnp.float32, rewind_room: int = 0,
                quantized: bool = False) -> tuple[kvattn.KVCache, ...]:
  """Returns a tuple of stacked `KVCache`s, one per run of layers sharing a window.

  Always a tuple (of one stack, for a model whose layers share one window):
  `caches[i]` is the stack of run i of `layer_runs(config)`, every leaf with
  that run's layers on a leading axis: k, v `[L, B, S, K, H]`, valid
  `[L, B, S]`, lengths `[L, B]`, index and overflow `[L]`. Layers with a
  window W (`Config.window_pattern`) get ring caches of
  S = W + rewind_room slots, max_len bounding the positions; global layers
  linear caches of S = max_len.
  `quantized=True` stores k and v as int8 with float32 scales (dtype must
  then be float32; see `kvattn.init_cache`). `step` updates every stack in
  place (`kvattn.scan_layers`).
  """
  def stack(window, count):
    one = kvattn.init_cache(batch, max_len, config.num_kv_heads, config.head_dim, dtype,
                            quantized=quantized, window=window,
                            rewind_room=rewind_room if window else 0)
    return jax.tree.map(lambda a: jnp.stack([a] * count), one)

  return tuple(stack(window, stop - start) for window, start, stop in layer_runs(config))


def step(params: Params, caches: Any, tokens: jax.Array, mask: jax.Array | None, *, config: Config,
         logits_at: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """Runs T new tokens through the model with caches: the `step_fn` of `kvattn.generate`.

  Args:
    params: see `init_params`.
    caches: `init_caches`' tuple of stacks (one per run of layers sharing a
      window); a single stack is taken too where there is one run, and
      returned as such.
    tokens: int `[B, T]` token ids in [0, V) (any id at padding). Ids out of
      range cannot raise under jit: they are clipped to [0, V - 1] (never NaN);
      `kvattn.generate` refuses them in concrete prompts.
    mask: bool `[B, T]`, True for real tokens (padding anywhere); None: all real.
    config: the static `Config`.
    logits_at: None, or int32 `[B]`: one column per row whose logits are
      wanted (a prompt's last real token); then only those are computed
      (the unembedding of every prompt token is a large share of a prefill
      at a large vocabulary) and logits are `[B, 1, V]`. `kvattn.generate`
      passes it to a step_fn that takes it.

  Returns:
    `(logits [B, T, V] float32, new caches)`; logits are zeros at padding.
    With learned positions (`max_positions` MP), a real token at position MP
    or later gets position MP - 1's embedding and sets every cache's sticky
    `overflow` flag (`kvattn.overflowed`): its logits are not the model's.
  """
  b, t = _check_tokens(tokens, mask)
  runs = layer_runs(config)
  single = isinstance(caches, kvattn.KVCache)  # One stack, as init_caches made before 0.3.
  stacks = (caches,) if single else tuple(caches)
  if len(stacks) != len(runs):
    raise ValueError(f"caches should be init_caches' tuple of {len(runs)} stacks (one per run "
                     f"of layers sharing a window): but got {len(stacks)}")
  positions = kvattn.token_positions(kvattn.layer_view(stacks[0], 0), mask, num_tokens=t)  # [B, T]
  h = _embed(params, tokens, positions, config, mask)

  def body(window, h, p, cache):
    attend = lambda x: kvattn.prefill(p["attn"], cache, x, mask, **_attention_options(
        config, window))
    return _block(p, h, attend, config)

  new = []
  for (window, start, stop), stack in zip(runs, stacks):  # One loop per run of layers.
    layers = _layers(params, start, stop)
    # The stack is carried and each layer's slots read and written in place.
    h, stack = kvattn.scan_layers(functools.partial(body, window), h, layers, stack)
    new.append(stack)
  caches = new[0] if single else tuple(new)
  if config.max_positions:  # Past the learned positions: reported as an overflow.
    real = jnp.ones((b, t), jnp.bool_) if mask is None else mask
    past = jnp.any(real & (positions >= config.max_positions))
    caches = jax.tree.map(lambda c: c._replace(overflow=c.overflow | past), caches,
                          is_leaf=lambda x: isinstance(x, kvattn.KVCache))
  if logits_at is not None:
    h = jnp.take_along_axis(h, logits_at[:, None, None].astype(jnp.int32), axis=1)  # [B, 1, DM]
    mask = None if mask is None else jnp.take_along_axis(mask, logits_at[:, None], axis=1)
  logits = _unembed(params, h, config)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, 0.0)
  return logits, caches


def check_paged_config(config: Config) -> None:
  """Raises ValueError for a config the paged cache cannot run yet (`paged_step`)."""
  check_config(config)
  windows = [w for w in config.layer_windows if w is not None]
  if windows:
    raise ValueError(f"config.window_pattern should have no window with a paged cache (the paged "
                     f"kernel attends to every cached token): but got {config.window_pattern!r}")
  if config.rope_scaling is not None and config.rope_scaling.kind == "longrope":
    raise ValueError("config.rope_scaling kind 'longrope' is not supported with a paged cache: it "
                     "picks its factors from the whole call's longest position")


def init_paged_caches(config: Config, num_pages: int, page_size: int, max_seqs: int,
                      pages_per_seq: int, dtype=jnp.float32,
                      quantized: bool = False) -> kvattn.paged.PagedCache:
  """Returns the paged cache of every layer: one stack, for `paged_step`.

  Pages `[L, NP, PS, K, H]` (int8 with scales `[L, NP, PS, K]` when
  quantized), one page table `[SQ, PPS]`, lengths `[SQ]` and refs `[NP]` for
  every layer: the layers write the same tokens into the same pages, so
  the bookkeeping is kept once and `kvattn.paged.reserve`, `release` and
  `fork` take the stack as they take one layer's cache. The arguments are
  `kvattn.paged.init_paged_cache`'s.
  """
  check_paged_config(config)
  return kvattn.paged.init_paged_cache(num_pages, page_size, max_seqs, pages_per_seq,
                                       config.num_kv_heads, config.head_dim, dtype,
                                       quantized=quantized, num_layers=config.num_layers)


def paged_step(params: Params, caches: kvattn.paged.PagedCache, tokens: jax.Array,
               seq_slots: jax.Array, cu_q_lens: jax.Array, num_seqs: int | jax.Array, *,
               config: Config,
               logits_at: jax.Array | None = None) -> tuple[jax.Array, kvattn.paged.PagedCache]:
  """Runs a ragged batch of new tokens through the model with a paged cache.

  `step` for `init_paged_caches`' stack: sequence i of the batch is slot
  `seq_slots[i]`, its tokens rows `cu_q_lens[i] .. cu_q_lens[i + 1]` of
  tokens, rows from `cu_q_lens[num_seqs]` on padding (the metadata of
  `kvattn.paged.paged_attention`). Prefill chunks and decode tokens mix
  freely. Reserve the pages first (`kvattn.paged.reserve` on the stack).
  Each layer reads and writes its pages of the stack in place
  (`kvattn.paged.scan_layers`): with the caches donated, the step's memory
  does not grow with the pool. Configs with windows or LongRoPE are refused
  (`check_paged_config`). With learned positions, a token past the last one
  reuses it, as in `step`: bound the lengths before (`kvattn.serving` refuses
  such requests).

  Shape legend (beyond the module's): TT tokens in the flat batch, B
  sequences in the batch.

  Args:
    params: see `init_params` (stacked or `unstack_layers`' per-layer).
    caches: `init_paged_caches`' stack.
    tokens: int `[TT]` token ids in [0, V) (any id at padding; out of range:
      clipped, as in `step`).
    seq_slots: int `[B]`; cu_q_lens: int `[B + 1]`; num_seqs: int or integer
      scalar (may be traced): the batch.
    config: the static `Config`.
    logits_at: None, or int `[R]`: the rows of the flat batch whose logits
      to return (e.g. each sequence's last token, `cu_q_lens[1:] - 1`; a row
      may repeat). The unembedding then costs R rows, not TT.

  Returns:
    `(logits, caches)`: logits float32 `[TT, V]`, or `[R, V]` with
    logits_at; zeros at padding rows.
  """
  check_paged_config(config)
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens should be int with shape (TT,): but got {shape} "
                     f"{getattr(tokens, 'dtype', None)}")
  if not isinstance(caches, kvattn.paged.PagedCache) or getattr(caches.k_pages, "ndim", None) != 5:
    raise ValueError(f"caches should be init_paged_caches' stack (k_pages (L, NP, PS, K, H)): but "
                     f"got {type(caches).__name__} "
                     f"{getattr(getattr(caches, 'k_pages', None), 'shape', None)}")
  tt = shape[0]
  if logits_at is not None:
    at_shape = getattr(logits_at, "shape", None)
    if at_shape is None or len(at_shape) != 1 or not jnp.issubdtype(logits_at.dtype, jnp.integer):
      raise ValueError(f"logits_at should be int with shape (R,): but got {at_shape} "
                       f"{getattr(logits_at, 'dtype', None)}")
  real = kvattn.paged.token_mask(caches, tt, seq_slots, cu_q_lens, num_seqs)  # [TT]
  positions = None
  if config.max_positions:
    positions = kvattn.paged.token_positions(caches, tt, seq_slots, cu_q_lens, num_seqs)[None]
  h = _embed(params, tokens[None], positions, config, real[None])  # [1, TT, DM]
  options = _attention_options(config, None)

  def body(h, p, cache):
    def attend(x):
      a, cache_out = kvattn.paged.paged_prefill(p["attn"], cache, x[0], seq_slots, cu_q_lens,
                                                num_seqs, **options)
      return a[None], cache_out

    return _block(p, h, attend, config)

  h, caches = kvattn.paged.scan_layers(body, h, _layers(params, 0, config.num_layers), caches)
  if logits_at is not None:
    rows = jnp.clip(logits_at.astype(jnp.int32), 0, tt - 1)
    h, real = h[:, rows], real[rows]
  logits = _unembed(params, h, config)[0]
  return jnp.where(real[:, None], logits, 0.0), caches


def step_fn(config: Config):
  """Returns `step` with its config bound; the same object per config, so jit caches hit.

  It carries `vocab_size` and `max_positions` (None without learned
  positions), which `kvattn.generate` checks concrete prompts against.
  """
  check_config(config)
  return _step_fn(config)


@functools.lru_cache(maxsize=None)
def _step_fn(config: Config):
  fn = functools.partial(step, config=config)
  fn.vocab_size = config.vocab_size
  fn.max_positions = config.max_positions or None
  return fn


def forward(params: Params, tokens: jax.Array, mask: jax.Array | None = None, *, config: Config,
            block_size: int | None = None) -> jax.Array:
  """The model over whole sequences, without a cache: logits `[B, T, V]` float32.

  For training and as the oracle of cached decoding: each layer's attention is
  `kvattn.self_attention` (the projections and attention numerics of
  `kvattn.prefill`, reverse-differentiable, memory O(T * block)). Positions
  count real tokens only, as `kvattn.token_positions` does. Logits are zeros
  at padding.

  Args:
    params: see `init_params`.
    tokens: int `[B, T]` token ids in [0, V) (any id at padding); ids out of
      range are clipped to [0, V - 1].
    mask: bool `[B, T]`, True for real tokens (padding anywhere); None: all real.
    config: the static `Config`.
    block_size: queries (and keys) per attention block; None for the default.
  """
  _, t = _check_tokens(tokens, mask)
  if config.max_positions and t > config.max_positions:
    raise ValueError(f"tokens should have at most the model's max_positions="
                     f"{config.max_positions} columns: but got shape {tokens.shape}")
  real = jnp.ones(tokens.shape, jnp.bool_) if mask is None else mask
  h = _embed(params, tokens, kvattn.masks.real_before(real), config, mask)

  def body(window, h, p):
    attend = lambda x: (kvattn.self_attention(p[
        "attn"], x, mask, window=window, block_size=block_size, **_attention_options(
            config, window)), None)
    return _block(p, h, attend, config)

  for window, start, stop in layer_runs(config):  # One scan per run of layers.
    layers = _layers(params, start, stop)
    if isinstance(layers, tuple):  # Per-layer params (`unstack_layers`): unrolled.
      for p in layers:
        h, _ = body(window, h, p)
    else:
      h, _ = lax.scan(functools.partial(body, window), h, layers)
  return jnp.where(real[:, :, None], _unembed(params, h, config), 0.0)


def _layer_norms(config: Config) -> tuple[str, ...]:
  """The norms of a layer, by `norm_placement`."""
  pre, post = ("ln1", "ln2"), ("post_ln1", "post_ln2")
  return {"pre": pre, "pre_post": pre + post, "post": post}[config.norm_placement]


def _attention_options(config: Config, window: int | None) -> dict[str, Any]:
  """The attention layer's settings for a run of layers with this window."""
  local = window is not None and config.rope_local_base is not None
  return dict(rope_base=config.rope_local_base if local else config.rope_base,
              rope_scaling=None if local else config.rope_scaling, rotary_dim=config.rotary_dim,
              scale=config.attn_scale, softcap=config.attn_softcap, qk_norm_eps=config.norm_eps)


def _block(p, h, attend, config: Config):
  """One layer over h `[B, T, DM]`: attention (`attend(x) -> (a, carry)`) and the MLP.

  Returns (h, carry): each sublayer's output is added to h, with the norms
  of `config.norm_placement` before it and/or on it.
  """
  pre, post = config.norm_placement != "post", config.norm_placement != "pre"
  a, carry = attend(_norm(p["ln1"], h, config) if pre else h)
  h = h + (_norm(p["post_ln1"], a, config) if post else a)
  m = _mlp(p["mlp"], _norm(p["ln2"], h, config) if pre else h, config)
  return h + (_norm(p["post_ln2"], m, config) if post else m), carry


def _layers(params, start, stop):
  """Layers start..stop-1: a slice of the stacked leaves, or of the tuple of per-layer params."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return tuple(layers[start:stop])
  return jax.tree.map(lambda a: a[start:stop], layers)


def unstack_layers(params: Params) -> Params:
  """params with `layers` as a tuple of L per-layer pytrees (leaves without the L axis).

  `step` and `forward` take either layout, with the same results: stacked
  layers run under `lax.scan` (one layer compiled), per-layer ones unrolled
  (L layers compiled: about 10 s for 30 layers on 2 CPU cores). Unstack for
  bfloat16 (or float16) weights on CPU: XLA:CPU multiplies them natively only
  when they enter the compiled step as parameters of their own; a weight
  sliced out of a stack is converted to float32 first (inside `lax.scan`, a
  float32 copy of every layer's weights per call). Do it once, outside jit
  (it copies each layer's leaves into arrays of their own), and pass the
  result to `kvattn.generate` or the jitted step.
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  num = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], layers) for i in range(num))}


def _check_tokens(tokens, mask) -> tuple[int, int]:
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens should be int with shape (B, T): but got {shape} "
                     f"{getattr(tokens, 'dtype', None)}")
  if mask is not None and (getattr(mask, "shape", None) != shape or mask.dtype != jnp.bool_):
    raise ValueError(f"mask should be bool with shape (B, T)={shape}: but got "
                     f"{getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)}")
  return shape


def _init_norm(config, dtype):
  scale = {"scale": jnp.ones((config.d_model,), dtype)}
  if config.norm == "rms_norm":
    return scale
  return {**scale, "bias": jnp.zeros((config.d_model,), dtype)}


def _norm(p, x, config):
  """LayerNorm or RMSNorm over DM, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  if config.norm == "rms_norm":
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.norm_eps)
    return (y * p["scale"][None, None].astype(jnp.float32)).astype(x.dtype)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * lax.rsqrt(var + config.norm_eps)
  scale, bias = (p[name][None, None].astype(jnp.float32) for name in ("scale", "bias"))
  return (y * scale + bias).astype(x.dtype)


def _dense(x, w, b):
  # float32 accumulation: XLA:CPU multiplies bfloat16 operands natively only
  # so (else it converts the whole weight to float32 on every call).
  y = jnp.einsum("BTD,DF->BTF", x, w, preferred_element_type=jnp.float32)
  y = y if b is None else y + b[None, None].astype(jnp.float32)
  return y.astype(jnp.result_type(x, w))


def _mlp(p, x, config):
  h = _ACTIVATIONS[config.activation](_dense(x, p["w_gate"], p.get("b_gate")) if config.
                                      gated_mlp else _dense(x, p["w_in"], p.get("b_in")))
  if config.gated_mlp:
    h = h * _dense(x, p["w_in"], p.get("b_in"))
  out = jnp.einsum("BTF,FD->BTD", h, p["w_out"], preferred_element_type=jnp.float32)
  out = out + p["b_out"][None, None].astype(jnp.float32) if "b_out" in p else out
  return out.astype(jnp.result_type(h, p["w_out"]))


def _embed(params, tokens, positions, config, mask):
  """Token (and learned position) embeddings; padding takes token 0's, whatever its id.

  Ids out of range are clipped to [0, V - 1]: jnp.take's default fills them
  with NaN (and 0 * NaN reaches the weights' gradients through padding).
  """
  if mask is not None:
    tokens = jnp.where(mask, tokens, 0)
  h = jnp.take(params["embed"], tokens, axis=0, mode="clip")
  if config.embed_scale is not None:
    h = h * jnp.asarray(config.embed_scale, h.dtype)
  if config.max_positions:
    # Past the last learned position the last one is reused (jnp.take would clamp too).
    pos = jnp.clip(positions, 0, config.max_positions - 1)
    h = h + jnp.take(params["pos_embed"], pos, axis=0)
  return h


def _unembed(params, h, config):
  # In the params' dtype with float32 accumulation: no float32 copy of a
  # bfloat16 [V, DM] matrix per step.
  h = _norm(params["ln_f"], h, config)
  if config.tie_embeddings:
    w, spec = params["embed"], "BTD,VD->BTV"
  else:
    w, spec = params["unembed"], "BTD,DV->BTV"
  logits = jnp.einsum(spec, h.astype(w.dtype), w, preferred_element_type=jnp.float32)
  if config.final_softcap is not None:
    logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
  return logits
