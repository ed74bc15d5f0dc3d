"""Llama-layout checkpoints in the Hugging Face format, mapped onto `kvattn.models.transformer`.

Reads `config.json` and the safetensors weights (one file or shards, see
`kvattn.models.checkpoint`) with numpy, no torch, for the model classes that
share Llama's tensor names (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`, RMSNorm weights) and differ by options,
each read as transformers reads it (`VARIANTS`):

  * `LlamaForCausalLM` and `MistralForCausalLM`: RMSNorm, SwiGLU MLP, RoPE
    with `rope_theta` and `rope_scaling`, grouped-query attention, tied or
    untied unembedding; Llama's optional `attention_bias` (q, k, v, o) and
    `mlp_bias`; Mistral's `sliding_window` on every layer (ring caches of
    that many slots, `Config.window_pattern=(W,)`);
  * `Qwen2ForCausalLM`: the same with q, k, v biases (and no output bias),
    often tied embeddings, and with `use_sliding_window` its window on the
    layers from `max_window_layers` on (`Config.window_pattern`);
  * `Qwen3ForCausalLM`: Qwen2's layout and windows plus `q_norm` and `k_norm`
    `[H]`, an RMSNorm of each head of q and k before RoPE
    (`Config.qk_norm="head"`); biases on q, k, v and o only with
    `attention_bias`; `head_dim` given (N * H need not be DM);
  * `Olmo2ForCausalLM`: no norm before attention or the MLP; their outputs are
    normalised before the residual add instead, by `post_attention_layernorm`
    and `post_feedforward_layernorm` (`Config.norm_placement="post"`), and
    `q_norm [N * H]` and `k_norm [K * H]` normalise the whole q and k
    projections before the split into heads (`Config.qk_norm="projection"`,
    loaded as `[N, H]` and `[K, H]`).

Both spellings of config.json are read: transformers 5's `rope_parameters`
and the older `rope_theta` and `rope_scaling`. Phi-3's fused tensors are split
into these names by `kvattn.models.phi3`, which reads its config with
`config_for` too.

Hugging Face's `nn.Linear` weights are `[out, in]`; they are transposed into
the Flax DenseGeneral layout of `kvattn.params` (`wq [DM, N, H]`, ...). Both
use the half-split RoPE layout, so no row of q or k is permuted.

In bfloat16, the last bits of the logits differ from transformers': RMSNorm
and RoPE are computed in float32 here and rounded once, where transformers
rounds the normalised activations and cos/sin to bfloat16 first.

Shape legend:
  L: number of layers
  V: vocabulary size
  DM: model width (hidden_size)
  F: MLP hidden width (intermediate_size)
  N: number of query heads
  K: number of key/value heads
  H: head dimension
  R: rotated features of a head (H, or fewer with `partial_rotary_factor`)
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from kvattn import rope
from kvattn.models import checkpoint
from kvattn.models import transformer


class Variant(NamedTuple):
  """What one model class makes of the Llama layout, as its transformers code reads config.json.

  Fields:
    name: the model class, as config.json's `architectures` names it.
    bias_options: the config keys of optional biases the class honours:
      "attention_bias" (q, k, v and o) and "mlp_bias" (gate, up and down).
      Set true where the class has no such key, they are refused: its
      transformers model has no place for those biases.
    qkv_bias: q, k, v biases whatever the config says (Qwen2).
    qk_norm: the `Config.qk_norm`, None, "head" or "projection".
    norm_placement: the `Config.norm_placement`, "pre" or "post".
    windows: how `sliding_window` is read (see `_window_pattern`): "none"
      (ignored), "all" (every layer, when set) or "qwen" (with
      `use_sliding_window`, per `layer_types` or from `max_window_layers` on).
    defaults: the class's defaults of the config keys whose defaults differ
      between the classes (used where config.json lacks the key).
    partial_rotary: reads `partial_rotary_factor`, rotating the first
      R = int(H * factor) features of each head (Phi-3); for the others a
      factor other than 1 is refused.
    rope_kinds: None, or the `rope.Scaling` kinds the class takes (Phi-3's
      config validation allows only LongRoPE).
  """

  name: str
  bias_options: tuple[str, ...] = ()
  qkv_bias: bool = False
  qk_norm: str | None = None
  norm_placement: str = "pre"
  windows: str = "none"
  defaults: Mapping[str, Any] = {}
  partial_rotary: bool = False
  rope_kinds: tuple[str, ...] | None = None


_ATTENTION_BIAS = ("attention_bias",)
# The classes read here, with the defaults of their transformers configs
# (LlamaConfig, MistralConfig, ...: rms_norm_eps 1e-6 and head_dim D // N
# unless listed; num_key_value_heads N unless listed).
VARIANTS = {
    v.name: v for v in (
        Variant("LlamaForCausalLM", bias_options=_ATTENTION_BIAS + ("mlp_bias",)),
        Variant("MistralForCausalLM", windows="all", defaults=dict(num_key_value_heads=8)),
        Variant("Qwen2ForCausalLM", qkv_bias=True, windows="qwen", defaults=dict(
            num_key_value_heads=32)),
        Variant("Qwen3ForCausalLM", bias_options=_ATTENTION_BIAS, qk_norm="head", windows="qwen",
                defaults=dict(num_key_value_heads=32, head_dim=128)),
        Variant("Olmo2ForCausalLM", bias_options=_ATTENTION_BIAS, qk_norm="projection",
                norm_placement="post", defaults=dict(rms_norm_eps=1e-5)),
    )
}
# config.json's model_type -> the class it stands for, as transformers maps them.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM"
}
ARCHITECTURES = tuple(MODEL_TYPES.values())
# Each layer's RMSNorms by the Config's norm_placement: params name -> Hugging Face name.
_LAYER_NORMS = {
    "pre": {
        "ln1": "input_layernorm",
        "ln2": "post_attention_layernorm"
    },
    "post": {
        "post_ln1": "post_attention_layernorm",
        "post_ln2": "post_feedforward_layernorm"
    },
}


def config_from_hf(hf: dict[str, Any]) -> transformer.Config:
  """Maps a Llama, Mistral, Qwen2, Qwen3 or OLMo 2 `config.json` onto the transformer's `Config`.

  Raises:
    ValueError: for a class this module does not read, or an option that
      cannot be run as transformers runs it (see `config_for`).
  """
  return config_for(hf, VARIANTS[_architecture(hf)])


def config_for(hf: dict[str, Any], variant: Variant) -> transformer.Config:
  """Maps a Llama-layout `config.json` onto the transformer's `Config`, as `variant` reads it.

  Keys: vocab_size, num_hidden_layers, hidden_size, num_attention_heads,
  num_key_value_heads, head_dim, intermediate_size, rms_norm_eps,
  tie_word_embeddings, hidden_act, the biases of `variant.bias_options`, RoPE
  (`rope_theta`, `rope_scaling` or transformers 5's `rope_parameters`, read
  by `rope_scaling_from_hf` with the whole config), `partial_rotary_factor`
  (Phi-3; in `rope_parameters` first, as transformers 5 reads it) and the
  sliding window (`_window_pattern`). Dropout rates, `pretraining_tp` (which
  only sliced the same weights at compute time) and the like are ignored.

  Raises:
    ValueError: naming the option: a `hidden_act` other than "silu"; a bias
      option the class does not have; a `partial_rotary_factor` other than 1
      where the class is not known to read it, or one that leaves an odd or
      zero number of rotated features; a RoPE scaling kvattn does not have
      ("dynamic") or the class does not take; LongRoPE factor lists of the
      wrong length.
  """
  name = variant.name

  def get(key, default=None):
    return hf.get(key, variant.defaults.get(key, default))

  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act should be 'silu': but got {hf['hidden_act']!r} "
                     f"(the activation of every checkpoint of these classes; no other is mapped)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key) and key not in variant.bias_options:
      raise ValueError(f"config.json: {key} should be false for {name}: but got "
                       f"{hf[key]!r} (its transformers model has no such biases and ignores the "
                       f"key, so what the checkpoint means by it is unknown)")
  dm, n = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = get("head_dim") or dm // n
  parameters = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here.
  theta = hf.get("rope_theta", parameters.get("rope_theta", 10_000.0))
  rotary_dim = _rotary_dim(hf, variant, head_dim)
  scaling = rope_scaling_from_hf(hf.get("rope_scaling") or parameters, hf=hf)
  if scaling is not None and variant.rope_kinds is not None and (scaling.kind
                                                                 not in variant.rope_kinds):
    raise ValueError(f"config.json: rope_scaling type should be 'default' or one of "
                     f"{variant.rope_kinds} for {name} (as its transformers config validates "
                     f"it): but got {scaling.kind!r}")
  rope.check_scaling(scaling, "config.json: rope_scaling", rotary_dim=rotary_dim or head_dim)
  attention_bias = "attention_bias" in variant.bias_options and bool(hf.get("attention_bias"))
  mlp_bias = "mlp_bias" in variant.bias_options and bool(hf.get("mlp_bias"))
  return transformer.Config(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      d_model=dm,
      num_heads=n,
      num_kv_heads=get("num_key_value_heads") or n,
      head_dim=head_dim,
      d_ff=hf["intermediate_size"],
      max_positions=0,
      rope_base=float(theta),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      activation="silu",
      # A bias that the checkpoint lacks while the Config wants it is loaded as zeros.
      use_bias=attention_bias or mlp_bias,
      norm_eps=get("rms_norm_eps", 1e-6),
      norm="rms_norm",
      gated_mlp=True,
      qkv_bias=variant.qkv_bias or attention_bias,
      rope_scaling=scaling,
      window_pattern=_window_pattern(hf, variant),
      norm_placement=variant.norm_placement,
      qk_norm=variant.qk_norm,
      rotary_dim=rotary_dim)


def _rotary_dim(hf: dict[str, Any], variant: Variant, head_dim: int) -> int | None:
  """The Config's rotary_dim: None where all H features rotate, else R = int(H * factor)."""
  parameters = hf.get("rope_parameters") or {}
  factor = parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if factor is None or factor == 1:
    return None
  if not variant.partial_rotary:
    raise ValueError(f"config.json: partial_rotary_factor should be 1 for {variant.name}: but "
                     f"got {factor!r} (read for Phi-3 only, whose rotary embedding applies it)")
  r = int(head_dim * factor)
  if r < 2 or r % 2 or r > head_dim:
    raise ValueError(f"config.json: partial_rotary_factor should leave an even number of rotated "
                     f"features, between 2 and head_dim={head_dim}: but got {factor!r}, which "
                     f"gives int({head_dim} * {factor!r}) = {r}")
  return None if r == head_dim else r


def rope_scaling_from_hf(scaling: dict[str, Any] | None,
                         hf: dict[str, Any] | None = None) -> rope.Scaling | None:
  """Maps Hugging Face's RoPE scaling dict onto `kvattn.rope.Scaling` (None: none).

  Reads config.json's `rope_scaling`, or transformers 5's `rope_parameters` (the
  same keys, with `rope_theta` and `partial_rotary_factor` beside them, which are
  left to the caller), as transformers 5 reads them:

    * "linear": `factor`.
    * "llama3": `factor`, `low_freq_factor` (default 1), `high_freq_factor`
      (default 4), `original_max_position_embeddings`.
    * "yarn": `factor`, `original_max_position_embeddings`, `beta_fast` (32 where
      missing or 0), `beta_slow` (1 likewise), `truncate` (default True),
      `attention_factor`; where that is missing and both `mscale` and
      `mscale_all_dim` are set, it is `(0.1 * mscale * ln(factor) + 1) /
      (0.1 * mscale_all_dim * ln(factor) + 1)` (DeepSeek's form; the softmax
      scale that DeepSeek's attention also derives from `mscale_all_dim` is the
      model's business, not RoPE's).
    * "longrope": `short_factor`, `long_factor`, `original_max_position_embeddings`,
      `factor` (only the default attention factor uses it), `attention_factor`.

  `original_max_position_embeddings` and a missing `factor` come from the whole
  config where transformers takes them from it, so pass it as `hf`: as
  transformers' `standardize_rope_params`, for "llama3", "yarn" and "longrope" a
  top-level `original_max_position_embeddings` overrides the dict's (for
  model_type "phi3" always, with Phi3Config's default of 4096), a missing one is
  `max_position_embeddings`, and a missing or null `factor` of "yarn" and
  "longrope" is `max_position_embeddings / original_max_position_embeddings`
  (Phi-3's configs set no factor). For model_type "phi3", the types "su" and
  "yarn" mean "longrope", as Phi3Config reads them. Without `hf`, the dict must
  hold what it needs ("llama3"'s original length defaults to 8192).

  Args:
    scaling: the `rope_scaling` or `rope_parameters` dict, or None.
    hf: None, or the whole config.json dict.

  Raises:
    ValueError: for "dynamic" (its rotation of a cached token changes as the
      context grows), a type not listed, or a missing field.
  """
  if not scaling:
    return None
  hf = hf or {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))

  def field(name):
    if scaling.get(name) is None:
      raise ValueError(f"config.json: rope_scaling {kind!r} should have {name}: but it has none")
    return scaling[name]

  if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):
    kind = "longrope"
  if kind == "default":
    return None
  if kind == "linear":
    return rope.Scaling("linear", float(field("factor")))
  if kind == "dynamic":
    raise ValueError("config.json: rope_scaling type 'dynamic' is not supported: its frequencies "
                     "depend on the longest sequence seen so far, so growing the context changes "
                     "the rotation of tokens already cached (not a rotation per position)")
  if kind not in ("llama3", "yarn", "longrope"):
    raise ValueError(f"config.json: rope_scaling type should be 'default', 'linear', 'llama3', "
                     f"'yarn' or 'longrope': but got {kind!r}")
  if hf.get("model_type") == "phi3":
    original = hf.get("original_max_position_embeddings", 4096)
  else:
    original = (hf.get("original_max_position_embeddings")
                or scaling.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
  if kind == "llama3":
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    return rope.Scaling("llama3", float(field("factor")), float(low), float(high),
                        int(original or 8192))
  if not original:
    raise ValueError(f"config.json: rope_scaling {kind!r} should have "
                     f"original_max_position_embeddings (in it, or pass the whole config as hf= "
                     f"for its max_position_embeddings): but it has none")
  factor = scaling.get("factor")
  if factor is None:
    if not hf.get("max_position_embeddings"):
      raise ValueError(f"config.json: rope_scaling {kind!r} without a factor needs "
                       f"max_position_embeddings / original_max_position_embeddings: pass the "
                       f"whole config as hf=")
    factor = hf["max_position_embeddings"] / original
  attention_factor = scaling.get("attention_factor")
  attention_factor = None if attention_factor is None else float(attention_factor)
  if kind == "longrope":
    return rope.Scaling("longrope", float(factor), original_max_positions=int(original),
                        attention_factor=attention_factor,
                        short_factor=tuple(map(float, field("short_factor"))),
                        long_factor=tuple(map(float, field("long_factor"))))
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if attention_factor is None and mscale and mscale_all_dim:

    def yarn_mscale(m):  # transformers' yarn_get_mscale(factor, m).
      return 1.0 if factor <= 1 else 0.1 * m * float(np.log(factor)) + 1.0

    attention_factor = yarn_mscale(mscale) / yarn_mscale(mscale_all_dim)
  beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
  truncate = bool(scaling.get("truncate", True))
  return rope.Scaling("yarn", float(factor), original_max_positions=int(original),
                      beta_fast=float(beta_fast), beta_slow=float(beta_slow), truncate=truncate,
                      attention_factor=attention_factor)


def params_from_hf(weights: dict[str, np.ndarray], config: transformer.Config,
                   dtype=np.float32) -> transformer.Params:
  """Maps Llama-layout tensors (by Hugging Face name) onto the transformer's params.

  Reads the layer norms of `config.norm_placement` ("pre": input_layernorm
  and post_attention_layernorm before attention and the MLP; "post":
  post_attention_layernorm and post_feedforward_layernorm on their outputs),
  and the qk-norm of `config.qk_norm` (`self_attn.q_norm`, `k_norm`: `[H]`
  per head, or `[N * H]`, `[K * H]` over the projection, loaded as `[N, H]`,
  `[K, H]`).

  Args:
    weights: the checkpoint's tensors by name ("model.layers.0.self_attn.q_proj.weight").
    config: from `config_from_hf`.
    dtype: the params' numpy dtype, e.g. np.float32 or ml_dtypes.bfloat16.

  Returns:
    numpy params in the layout of `transformer.init_params`.
  """
  c = config
  if c.norm_placement not in _LAYER_NORMS:
    raise ValueError(f"config.norm_placement should be one of {sorted(_LAYER_NORMS)} for a "
                     f"Llama-layout checkpoint: but got {c.norm_placement!r}")
  w = checkpoint.Tensors(weights, dtype, "the checkpoint")
  dm, n, kh, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff

  def linear(name, out_shape, in_size):
    """nn.Linear weight [out, in] -> [in, *out_shape]."""
    return w.take(name, (int(np.prod(out_shape)), in_size)).T.reshape(in_size, *out_shape)

  def bias(name, shape, required):
    """A bias from the file; absent and not required, zeros (see `config_from_hf`)."""
    if name in w or required:
      return w.take(name, (int(np.prod(shape)),)).reshape(shape)
    return np.zeros(shape, dtype)

  # Views of the file until here; the stacking below and `w.own` copy each
  # tensor once, transposed and cast on the way.

  def layer(i):
    pre = f"model.layers.{i}."
    attn = {
        "wq": linear(pre + "self_attn.q_proj.weight", (n, h), dm),
        "wk": linear(pre + "self_attn.k_proj.weight", (kh, h), dm),
        "wv": linear(pre + "self_attn.v_proj.weight", (kh, h), dm),
        "wo": w.take(pre + "self_attn.o_proj.weight", (dm, n * h)).T.reshape(n, h, dm)
    }
    if c.qkv_bias:
      attn.update(bq=bias(pre + "self_attn.q_proj.bias", (n, h),
                          True), bk=bias(pre + "self_attn.k_proj.bias", (kh, h), True),
                  bv=bias(pre + "self_attn.v_proj.bias", (kh, h), True))
    if c.qk_norm == "head":
      attn.update(q_norm=w.take(pre + "self_attn.q_norm.weight", (h,)),
                  k_norm=w.take(pre + "self_attn.k_norm.weight", (h,)))
    elif c.qk_norm == "projection":
      attn.update(q_norm_proj=w.take(pre + "self_attn.q_norm.weight", (n * h,)).reshape(n, h),
                  k_norm_proj=w.take(pre + "self_attn.k_norm.weight", (kh * h,)).reshape(kh, h))
    mlp = {
        "w_gate": linear(pre + "mlp.gate_proj.weight", (f,), dm),
        "w_in": linear(pre + "mlp.up_proj.weight", (f,), dm),
        "w_out": linear(pre + "mlp.down_proj.weight", (dm,), f)
    }
    if c.use_bias:
      attn["bo"] = bias(pre + "self_attn.o_proj.bias", (dm,), False)
      mlp.update(b_gate=bias(pre + "mlp.gate_proj.bias", (f,),
                             False), b_in=bias(pre + "mlp.up_proj.bias", (f,), False),
                 b_out=bias(pre + "mlp.down_proj.bias", (dm,), False))
    norms = {
        key: {
            "scale": w.take(pre + name + ".weight", (dm,))
        } for key, name in _LAYER_NORMS[c.norm_placement].items()
    }
    return {"attn": attn, "mlp": mlp, **norms}

  params = {
      "embed": w.own(w.take("model.embed_tokens.weight", (c.vocab_size, dm))),
      "layers": checkpoint.tree_stack((layer(i) for i in range(c.num_layers)), dtype),
      "ln_f": {
          "scale": w.own(w.take("model.norm.weight", (dm,)))
      }
  }
  if not c.tie_embeddings:
    params["unembed"] = w.own(w.take("lm_head.weight", (c.vocab_size, dm)).T)
  return params


def load(directory: str | pathlib.Path,
         dtype=np.float32) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """Reads a checkpoint directory; returns (numpy params, config, hf_config).

  Args:
    directory: holds `config.json` and `model.safetensors` or the shards of
      `model.safetensors.index.json`.
    dtype: the params' numpy dtype (np.float32, or ml_dtypes.bfloat16 to keep
      a bfloat16 checkpoint's memory).
  """
  return load_with(directory, dtype, config_from_hf=config_from_hf, params_from_hf=params_from_hf)


def load_with(
    directory: str | pathlib.Path, dtype, *, config_from_hf: Callable[[dict[str, Any]],
                                                                      transformer.Config],
    params_from_hf: Callable[..., transformer.Params]
) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """`load` with a family's own mappings (`phi3.load`): config.json first, then the tensors."""
  hf = checkpoint.read_config(directory)
  config = config_from_hf(hf)
  # Rotary caches some checkpoints store are recomputed, never read.
  weights = checkpoint.read_tensors(directory, keep=lambda name: "rotary_emb" not in name)
  return params_from_hf(weights, config, dtype), config, hf


def _window_pattern(hf: dict[str, Any], variant: Variant) -> tuple[int | None, ...]:
  """The Config's `window_pattern`, as transformers reads config.json.

  "all" (Mistral, Phi-3) windows every layer by `sliding_window` (None or 0:
  none). "qwen" (Qwen2, Qwen3) windows only with `use_sliding_window`, and
  then by `sliding_window` (default 4096) the layers `layer_types` names
  "sliding_attention", or else those from `max_window_layers` (default 28)
  on. "none" (Llama, OLMo 2): no window, a `sliding_window` key is ignored.
  A pattern that windows every layer or none is shortened to `(W,)` or `()`.
  """
  if variant.windows == "all":
    return (hf["sliding_window"],) if hf.get("sliding_window") else ()
  if variant.windows != "qwen" or not hf.get("use_sliding_window"):
    return ()
  window = hf.get("sliding_window", 4096)
  if window is None:
    return ()
  layers = hf["num_hidden_layers"]
  kinds = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(layers)
  ]
  pattern = tuple(window if kind == "sliding_attention" else None for kind in kinds)
  if all(w is None for w in pattern):
    return ()
  if all(w is not None for w in pattern):
    return (window,)
  return pattern


def _architecture(hf: dict[str, Any]) -> str:
  return checkpoint.architecture(hf, MODEL_TYPES, "llama.load")
