"""Llama-family checkpoints in the Hugging Face layout, mapped onto `kvattn.models.transformer`.

Reads `config.json` and the safetensors weights (one file or shards, see
`kvattn.models.checkpoint`) with numpy, no torch, for:

  * `LlamaForCausalLM` and `MistralForCausalLM`: RMSNorm, SwiGLU MLP, RoPE
    with `rope_theta` and `rope_scaling` "llama3" or "linear", grouped-query
    attention, optional `attention_bias` and `mlp_bias`, tied or untied
    unembedding, Mistral's `sliding_window` on every layer (ring caches of
    that many slots, `Config.window_pattern=(W,)`);
  * `Qwen2ForCausalLM`: the same with q, k, v biases (and no output bias),
    often tied embeddings, and with `use_sliding_window` its window on the
    layers from `max_window_layers` on (`Config.window_pattern`).

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
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from kvattn import rope
from kvattn.models import checkpoint
from kvattn.models import transformer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# config.json's model_type -> the class it stands for, as transformers maps them.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: dict[str, Any]) -> transformer.Config:
  """Maps a Llama, Mistral or Qwen2 `config.json` onto the transformer's `Config`."""
  architecture = _architecture(hf)
  qwen2 = architecture == "Qwen2ForCausalLM"
  pattern = _window_pattern(hf, architecture)
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act should be 'silu': but got {hf['hidden_act']!r}")
  # pretraining_tp > 1 only sliced the same full weights at compute time: ignored.
  dm, n = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or dm // n
  parameters = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here.
  theta = hf.get("rope_theta", parameters.get("rope_theta", 10_000.0))
  attention_bias = bool(hf.get("attention_bias", False))
  mlp_bias = bool(hf.get("mlp_bias", False))
  return transformer.Config(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=dm,
      num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=head_dim,
      d_ff=hf["intermediate_size"], max_positions=0, rope_base=float(theta),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), activation="silu",
      # A bias that the checkpoint lacks while the Config wants it is loaded as zeros.
      use_bias=attention_bias or mlp_bias, norm_eps=hf.get("rms_norm_eps", 1e-6),
      norm="rms_norm", gated_mlp=True, qkv_bias=qwen2 or attention_bias,
      rope_scaling=rope_scaling_from_hf(hf.get("rope_scaling") or parameters),
      window_pattern=pattern)


def rope_scaling_from_hf(scaling: dict[str, Any] | None) -> rope.Scaling | None:
  """Maps Hugging Face's `rope_scaling` dict onto `kvattn.rope.Scaling` (None: none)."""
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return rope.Scaling("linear", float(scaling["factor"]))
  if kind == "llama3":
    return rope.Scaling("llama3", float(scaling["factor"]),
                        float(scaling.get("low_freq_factor", 1.0)),
                        float(scaling.get("high_freq_factor", 4.0)),
                        int(scaling.get("original_max_position_embeddings", 8192)))
  raise ValueError(f"config.json: rope_scaling type should be 'default', 'linear' or "
                   f"'llama3': but got {kind!r}")


def params_from_hf(weights: dict[str, np.ndarray], config: transformer.Config,
                   dtype=np.float32) -> transformer.Params:
  """Maps Llama-layout tensors (by Hugging Face name) onto the transformer's params.

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

  def bias(name, shape, required):
    """A bias from the file; absent and not required, zeros (see `config_from_hf`)."""
    if name in w or required:
      return w.take(name, (int(np.prod(shape)),)).reshape(shape)
    return np.zeros(shape, dtype)

  # Views of the file until here; the stacking below and `w.own` copy each
  # tensor once, transposed and cast on the way.

  def layer(i):
    pre = f"model.layers.{i}."
    attn = {"wq": linear(pre + "self_attn.q_proj.weight", (n, h), dm),
            "wk": linear(pre + "self_attn.k_proj.weight", (kh, h), dm),
            "wv": linear(pre + "self_attn.v_proj.weight", (kh, h), dm),
            "wo": w.take(pre + "self_attn.o_proj.weight", (dm, n * h)).T.reshape(n, h, dm)}
    if c.qkv_bias:
      attn.update(bq=bias(pre + "self_attn.q_proj.bias", (n, h), True),
                  bk=bias(pre + "self_attn.k_proj.bias", (kh, h), True),
                  bv=bias(pre + "self_attn.v_proj.bias", (kh, h), True))
    mlp = {"w_gate": linear(pre + "mlp.gate_proj.weight", (f,), dm),
           "w_in": linear(pre + "mlp.up_proj.weight", (f,), dm),
           "w_out": linear(pre + "mlp.down_proj.weight", (dm,), f)}
    if c.use_bias:
      attn["bo"] = bias(pre + "self_attn.o_proj.bias", (dm,), False)
      mlp.update(b_gate=bias(pre + "mlp.gate_proj.bias", (f,), False),
                 b_in=bias(pre + "mlp.up_proj.bias", (f,), False),
                 b_out=bias(pre + "mlp.down_proj.bias", (dm,), False))
    return {"ln1": {"scale": w.take(pre + "input_layernorm.weight", (dm,))},
            "attn": attn,
            "ln2": {"scale": w.take(pre + "post_attention_layernorm.weight", (dm,))},
            "mlp": mlp}

  params = {"embed": w.own(w.take("model.embed_tokens.weight", (c.vocab_size, dm))),
            "layers": checkpoint.tree_stack((layer(i) for i in range(c.num_layers)), dtype),
            "ln_f": {"scale": w.own(w.take("model.norm.weight", (dm,)))}}
  if not c.tie_embeddings:
    params["unembed"] = w.own(w.take("lm_head.weight", (c.vocab_size, dm)).T)
  return params


def load(directory: str | pathlib.Path, dtype=np.float32
         ) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """Reads a checkpoint directory; returns (numpy params, config, hf_config).

  Args:
    directory: holds `config.json` and `model.safetensors` or the shards of
      `model.safetensors.index.json`.
    dtype: the params' numpy dtype (np.float32, or ml_dtypes.bfloat16 to keep
      a bfloat16 checkpoint's memory).
  """
  hf = checkpoint.read_config(directory)
  config = config_from_hf(hf)
  # Rotary caches some checkpoints store are recomputed, never read.
  weights = checkpoint.read_tensors(directory, keep=lambda name: "rotary_emb" not in name)
  return params_from_hf(weights, config, dtype), config, hf


def _window_pattern(hf: dict[str, Any], architecture: str) -> tuple[int | None, ...]:
  """The Config's `window_pattern`, as transformers reads config.json.

  Mistral windows every layer by `sliding_window` (None: none). Qwen2 does
  only with `use_sliding_window`, and then the layers `layer_types` names
  "sliding_attention", or else those from `max_window_layers` (default 28)
  on. Llama has no window: a `sliding_window` key there is ignored. A
  pattern that windows every layer or none is shortened to `(W,)` or `()`.
  """
  window = hf.get("sliding_window")
  if architecture == "MistralForCausalLM":
    return () if window is None else (window,)
  if architecture != "Qwen2ForCausalLM" or not hf.get("use_sliding_window") or window is None:
    return ()
  layers = hf["num_hidden_layers"]
  kinds = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(layers)]
  pattern = tuple(window if kind == "sliding_attention" else None for kind in kinds)
  if all(w is None for w in pattern):
    return ()
  if all(w is not None for w in pattern):
    return (window,)
  return pattern


def _architecture(hf: dict[str, Any]) -> str:
  return checkpoint.architecture(hf, MODEL_TYPES, "llama.load")
