"""Gemma, Gemma 2 and Gemma 3 (text) checkpoints in the Hugging Face layout, mapped onto
`kvattn.models.transformer`.

Reads `config.json` and the safetensors weights (see `kvattn.models.checkpoint`)
with numpy, no torch, as transformers 5 reads them, for:

  * `GemmaForCausalLM` (model_type "gemma"): Llama's layout with RMSNorms that
    multiply by (1 + w), token embeddings times sqrt(DM), a GeGLU MLP (tanh
    GELU; the released configs' `hidden_act: "gelu"` means it, as
    transformers 5 reads it), tied unembedding, often multi-query attention;
  * `Gemma2ForCausalLM` ("gemma2"): also norms on the attention and MLP
    outputs before the residual add (`norm_placement="pre_post"`), attention
    logits scaled by `query_pre_attn_scalar ** -0.5` and soft-capped by
    `attn_logit_softcapping`, output logits by `final_logit_softcapping`, and
    sliding-window layers (`sliding_window`) where `layer_types` says so, else
    on the even layers;
  * `Gemma3ForCausalLM` ("gemma3_text", the text-only checkpoints such as
    gemma-3-1b): Gemma 2 plus q_norm and k_norm (per head, before RoPE), one
    global layer every `sliding_window_pattern` (default 6) unless
    `layer_types` says otherwise, RoPE per layer type (the local layers their
    own base and no scaling: `Config.rope_local_base`; the global ones
    `rope_theta` and e.g. linear scaling) and no attention soft cap:
    transformers 5 ignores `attn_logit_softcapping` in Gemma 3, so this
    loader does too (the output cap is applied where set).

Both spellings of config.json are read: transformers 5's (`rope_parameters`,
nested by layer type for Gemma 3; `layer_types`) and the older one of the Hub
checkpoints (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`sliding_window_pattern`). The multimodal `Gemma3ForConditionalGeneration`
(model_type "gemma3") is not read.

Every Gemma RMSNorm weight w (input, post-attention, pre- and post-feedforward
layernorms, the final norm, q_norm and k_norm) is loaded as 1 + w, computed in
float32 and then cast to the params' dtype: the transformer's RMSNorm
multiplies by its scale, Gemma's by (1 + w). In bfloat16 that rounds 1 + w to
bfloat16 once (transformers adds 1 in float32 at every call).

Shape legend:
  L: number of layers
  V: vocabulary size
  DM: model width (hidden_size)
  F: MLP hidden width (intermediate_size)
  N: number of query heads
  K: number of key/value heads
  H: head dimension
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from kvattn.models import checkpoint
from kvattn.models import llama
from kvattn.models import transformer

# config.json's model_type -> the class it stands for, as transformers maps them.
MODEL_TYPES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM"
}

# transformers' spellings of the tanh approximation of GELU (ACT2FN).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def config_from_hf(hf: dict[str, Any]) -> transformer.Config:
  """Maps a Gemma, Gemma 2 or Gemma 3 text `config.json` onto the transformer's `Config`.

  Keys that are missing take transformers 5's defaults (head_dim 256,
  query_pre_attn_scalar 256, sliding_window 4096, Gemma 2's soft caps 50
  and 30, RoPE base 10000, or 1e6 global and 1e4 local in Gemma 3).

  Raises:
    ValueError: for what kvattn cannot run as transformers does, naming the
      option: `use_bidirectional_attention`, an activation other than tanh
      GELU, a rope type the rope module refuses ("dynamic"), RoPE on part of
      a head, scaled RoPE on Gemma 3's local layers, sliding layers without
      a `sliding_window`, or `layer_types` that are not L of
      "sliding_attention" and "full_attention".
  """
  architecture = _architecture(hf)
  gemma1, gemma2, gemma3 = (architecture == name for name in MODEL_TYPES.values())
  if hf.get("use_bidirectional_attention"):
    raise ValueError("config.json: use_bidirectional_attention should be false or absent: but got "
                     f"{hf['use_bidirectional_attention']!r} (kvattn's attention is causal)")
  _check_activation(hf, gemma1)
  windows = _layer_windows(hf, architecture)
  global_rope, local_rope = _rope_parameters(hf, gemma3)
  rope_local_base = None
  if gemma3 and any(w is not None for w in windows):
    if local_rope.get("rope_type", local_rope.get("type", "default")) != "default":
      raise ValueError(f"config.json: the sliding_attention layers' rope_parameters should have "
                       f"rope_type 'default' (kvattn scales only the global layers' RoPE): but "
                       f"got {local_rope!r}")
    rope_local_base = float(local_rope["rope_theta"])
  attention_bias = bool(hf.get("attention_bias", False))
  # Soft caps: Gemma 2's both (defaults 50 and 30), Gemma 3's output cap only.
  attn_softcap = _cap(hf, "attn_logit_softcapping", 50.0) if gemma2 else None
  final_softcap = None if gemma1 else _cap(hf, "final_logit_softcapping", 30.0 if gemma2 else None)
  return transformer.Config(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      d_model=hf["hidden_size"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf.get("head_dim") or 256,
      d_ff=hf["intermediate_size"],
      max_positions=0,
      rope_base=float(global_rope["rope_theta"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      activation="gelu_tanh",
      # attention_bias puts biases on q, k, v and o; the MLP's, which the
      # checkpoint lacks, are loaded as zeros (as llama.py does).
      use_bias=attention_bias,
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      norm="rms_norm",
      gated_mlp=True,
      qkv_bias=attention_bias,
      rope_scaling=llama.rope_scaling_from_hf(global_rope, hf),
      window_pattern=_shortest_pattern(windows),
      norm_placement="pre" if gemma1 else "pre_post",
      # transformers multiplies by a float32 tensor of sqrt(DM), cast to the
      # weights' dtype: the same float32 value here, which `_embed` casts.
      embed_scale=float(np.float32(hf["hidden_size"]**0.5)),
      attn_scale=None if gemma1 else float(hf.get("query_pre_attn_scalar", 256))**-0.5,
      attn_softcap=attn_softcap,
      final_softcap=final_softcap,
      qk_norm="head" if gemma3 else None,
      rope_local_base=rope_local_base)


def params_from_hf(weights: dict[str, np.ndarray], config: transformer.Config,
                   dtype=np.float32) -> transformer.Params:
  """Maps Gemma-layout tensors (by Hugging Face name) onto the transformer's params.

  Every RMSNorm weight w becomes the scale 1 + w, added in float32 before the
  cast to `dtype`.

  Args:
    weights: the checkpoint's tensors by name ("model.layers.0.self_attn.q_proj.weight").
    config: from `config_from_hf`.
    dtype: the params' numpy dtype, e.g. np.float32 or ml_dtypes.bfloat16.

  Returns:
    numpy params in the layout of `transformer.init_params`.
  """
  c = config
  w = checkpoint.Tensors(weights, dtype, "the checkpoint")
  dm, n, kh, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff

  def linear(name, out_shape, in_size):
    """nn.Linear weight [out, in] -> [in, *out_shape]."""
    return w.take(name, (int(np.prod(out_shape)), in_size)).T.reshape(in_size, *out_shape)

  def bias(name, shape):
    return w.take(name, (int(np.prod(shape)),)).reshape(shape)

  def norm(name, size):
    """Gemma's (1 + w), in float32 (a small copy; the cast to dtype comes with the stacking)."""
    return np.asarray(w.take(name, (size,)), np.float32) + np.float32(1)

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
      for name, heads in (("q", n), ("k", kh), ("v", kh)):
        attn["b" + name] = bias(f"{pre}self_attn.{name}_proj.bias", (heads, h))
    if c.qk_norm == "head":
      attn.update(q_norm=norm(pre + "self_attn.q_norm.weight", h),
                  k_norm=norm(pre + "self_attn.k_norm.weight", h))
    mlp = {
        "w_gate": linear(pre + "mlp.gate_proj.weight", (f,), dm),
        "w_in": linear(pre + "mlp.up_proj.weight", (f,), dm),
        "w_out": linear(pre + "mlp.down_proj.weight", (dm,), f)
    }
    if c.use_bias:
      attn["bo"] = bias(pre + "self_attn.o_proj.bias", (dm,))
      zeros = {"b_gate": (f,), "b_in": (f,), "b_out": (dm,)}
      mlp.update({name: np.zeros(shape, dtype) for name, shape in zeros.items()})
    # Gemma 1 normalises the MLP's input with post_attention_layernorm (as
    # Llama); Gemma 2 and 3 the attention's output, and the MLP's input with
    # pre_feedforward_layernorm.
    if c.norm_placement == "pre":
      norms = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    else:
      norms = {
          "ln1": "input_layernorm",
          "post_ln1": "post_attention_layernorm",
          "ln2": "pre_feedforward_layernorm",
          "post_ln2": "post_feedforward_layernorm"
      }
    scales = {key: {"scale": norm(f"{pre}{name}.weight", dm)} for key, name in norms.items()}
    return {"attn": attn, "mlp": mlp, **scales}

  params = {
      "embed": w.own(w.take("model.embed_tokens.weight", (c.vocab_size, dm))),
      "layers": checkpoint.tree_stack((layer(i) for i in range(c.num_layers)), dtype),
      "ln_f": {
          "scale": w.own(norm("model.norm.weight", dm))
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
  return llama.load_with(directory, dtype, config_from_hf=config_from_hf,
                         params_from_hf=params_from_hf)


def _check_activation(hf: dict[str, Any], gemma1: bool) -> None:
  """Refuses an MLP activation other than tanh GELU, read as transformers 5 reads it.

  Gemma 1 reads `hidden_act` (default tanh GELU), whose "gelu" in the
  released configs transformers 5 takes for the tanh form; Gemma 2 and 3
  read `hidden_activation`, where "gelu" is exact GELU.
  """
  name = "hidden_act" if gemma1 else "hidden_activation"
  accepted = _TANH_GELU + ("gelu",) if gemma1 else _TANH_GELU
  value = hf.get(name) or "gelu_pytorch_tanh"
  if value not in accepted:
    raise ValueError(f"config.json: {name} should be tanh GELU, Gemma's activation (one of "
                     f"{accepted}): but got {value!r}")


def _layer_windows(hf: dict[str, Any], architecture: str) -> tuple[int | None, ...]:
  """Each layer's window (None: global), as transformers 5 decides.

  `layer_types` when given; else Gemma 2 windows the even layers and Gemma
  3 every layer but each `sliding_window_pattern`-th (default 6: layers 5,
  11, ... are global). Gemma 1 has no window. transformers' window, key j
  seen by query i when `i - j < sliding_window`, is kvattn's W.
  """
  count = hf["num_hidden_layers"]
  if architecture == "GemmaForCausalLM":
    return (None,) * count
  kinds = hf.get("layer_types")
  if kinds is None:
    every = 2 if architecture == "Gemma2ForCausalLM" else hf.get("sliding_window_pattern", 6)
    kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(count)]
  if len(kinds) != count or any(kind not in _LAYER_TYPES for kind in kinds):
    raise ValueError(f"config.json: layer_types should be num_hidden_layers={count} of "
                     f"{_LAYER_TYPES}: but got {kinds!r}")
  window = hf.get("sliding_window", 4096)
  if "sliding_attention" in kinds and not (isinstance(window, int) and window > 0):
    raise ValueError(f"config.json: sliding_window should be a positive int where layer_types "
                     f"has sliding_attention layers: but got {window!r}")
  return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def _shortest_pattern(windows: tuple[int | None, ...]) -> tuple[int | None, ...]:
  """The shortest `Config.window_pattern` that repeats into `windows`: () for no window at all.

  Gemma 2's (W, None, W, None, ...) becomes (W, None), Gemma 3's five local
  layers and one global (W, W, W, W, W, None), even where L is no multiple of
  the period.
  """
  if all(w is None for w in windows):
    return ()
  for period in range(1, len(windows) + 1):
    if all(w == windows[i % period] for i, w in enumerate(windows)):
      return windows[:period]
  return windows  # Not reached: the whole tuple is a period of itself.


def _rope_parameters(hf: dict[str, Any], gemma3: bool) -> tuple[dict[str, Any], dict[str, Any]]:
  """(global, local) RoPE settings with `rope_theta` set, from either spelling.

  As transformers 5: an older `rope_scaling` wins over `rope_parameters`,
  whose own `rope_theta` wins over the top-level key. Gemma 3 nests
  `rope_parameters` by layer type; in the older spelling its global layers
  take `rope_theta` (default 1e6) and `rope_scaling`, its local ones
  `rope_local_base_freq` (default 1e4). Gemma 1 and 2 use one setting for
  every layer (local = global).
  """
  parameters = hf.get("rope_parameters") or {}
  if not gemma3:
    rope = dict(hf.get("rope_scaling") or parameters)
    rope.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    _check_whole_head(rope, hf)
    return rope, rope
  if parameters and not set(parameters) <= set(_LAYER_TYPES):
    raise ValueError(f"config.json: Gemma 3's rope_parameters should be nested by layer type "
                     f"{_LAYER_TYPES}: but got keys {sorted(parameters)}")
  full = dict(parameters.get("full_attention") or {"rope_type": "default"})
  full.update(hf.get("rope_scaling") or {})
  full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
  local = dict(parameters.get("sliding_attention") or {"rope_type": "default"})
  local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
  _check_whole_head(full, hf)
  _check_whole_head(local, hf)
  return full, local


def _check_whole_head(rope: dict[str, Any], hf: dict[str, Any]) -> None:
  # Gemma's attention rotates all of q and k with cos and sin of the rotated
  # width: transformers cannot run a partial rotation either. A top-level
  # partial_rotary_factor goes into rope_parameters, as transformers 5 moves it.
  factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor != 1.0:
    raise ValueError(f"config.json: rope partial_rotary_factor should be 1.0 for Gemma (RoPE on "
                     f"the whole head): but got {factor!r}")


def _cap(hf: dict[str, Any], name: str, default: float | None) -> float | None:
  """A soft cap: the key's value (null: none), or transformers' default where it is missing."""
  value = hf.get(name, default)
  return None if value is None else float(value)


def _architecture(hf: dict[str, Any]) -> str:
  classes = list(hf.get("architectures") or [])
  ours = any(name in MODEL_TYPES.values() for name in classes)
  if not ours and ("Gemma3ForConditionalGeneration" in classes or hf.get("model_type") == "gemma3"):
    raise ValueError(f"config.json: gemma.load takes the text-only Gemma3ForCausalLM (model_type "
                     f"'gemma3_text'): but got architectures {classes} and model_type "
                     f"{hf.get('model_type')!r}, the multimodal Gemma 3 (a vision tower, and the "
                     f"text weights under model.language_model)")
  return checkpoint.architecture(hf, MODEL_TYPES, "gemma.load")
