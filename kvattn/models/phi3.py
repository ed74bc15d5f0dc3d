"""Phi-3 checkpoints (`Phi3ForCausalLM`) in the Hugging Face layout, mapped onto
`kvattn.models.transformer`.

Phi-3 (mini, medium; 4k and 128k), Phi-3.5-mini and Phi-4-mini are Llama's
model with fused tensors: `self_attn.qkv_proj [(N + 2K) H, DM]`, rows q then k
then v, and `mlp.gate_up_proj [2F, DM]`, gate first. They are split into row
views under Llama's names (no copy) and read by `llama.params_from_hf`; the
config is read by `llama.config_for` with `VARIANT`:

  * RMSNorm with `rms_norm_eps` (default 1e-5), SwiGLU, no biases, untied
    unembedding unless `tie_word_embeddings` (Phi-4-mini);
  * `sliding_window`, where set, on every layer (`Config.window_pattern=(W,)`);
  * `partial_rotary_factor` (in `rope_parameters` first, then at the top
    level, as transformers 5 reads it): RoPE on the first
    R = int(H * factor) features of each head (`Config.rotary_dim`);
  * RoPE scaling "longrope" only (Phi3Config refuses the others; "su" and
    "yarn" are its older names for it), with `original_max_position_embeddings`
    from the top level of config.json (default 4096) and, where the config
    sets no `factor`, the attention factor of
    max_position_embeddings / original_max_position_embeddings (see
    `llama.rope_scaling_from_hf`).

LongRoPE with a cache: as in transformers, each call's largest position picks
the long or the short factors for the whole call (`kvattn.rope.Scaling`). A
prompt prefilled past `original_max_position_embeddings` is rotated with the
long factors throughout; one that stays within it is cached with the short
ones, and the decode steps past it rotate their own tokens with the long
factors while the cached keys keep theirs: transformers' own cached
generation does the same, so its logits are matched call for call (they then
differ from a single uncached forward over the whole sequence).

Shape legend:
  L: number of layers
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

VARIANT = llama.Variant("Phi3ForCausalLM", windows="all", defaults=dict(rms_norm_eps=1e-5),
                        partial_rotary=True, rope_kinds=("longrope",))
# config.json's model_type -> the class it stands for, as transformers maps them.
MODEL_TYPES = {"phi3": "Phi3ForCausalLM"}


def config_from_hf(hf: dict[str, Any]) -> transformer.Config:
  """Maps a Phi-3 `config.json` onto the transformer's `Config` (see `llama.config_for`)."""
  checkpoint.architecture(hf, MODEL_TYPES, "phi3.load")
  return llama.config_for(hf, VARIANT)


def params_from_hf(weights: dict[str, np.ndarray], config: transformer.Config,
                   dtype=np.float32) -> transformer.Params:
  """Maps Phi-3 tensors (by Hugging Face name) onto the transformer's params.

  Args:
    weights: the checkpoint's tensors by name ("model.layers.0.self_attn.qkv_proj.weight").
    config: from `config_from_hf`.
    dtype: the params' numpy dtype, e.g. np.float32 or ml_dtypes.bfloat16.
  """
  return llama.params_from_hf(split_fused(weights, config), config, dtype)


def split_fused(weights: dict[str, np.ndarray],
                config: transformer.Config) -> dict[str, np.ndarray]:
  """The tensors with each layer's fused ones replaced by Llama's: row views, no copy.

  `self_attn.qkv_proj.weight [(N + 2K) H, DM]` becomes `q_proj [N H, DM]`,
  `k_proj [K H, DM]` and `v_proj [K H, DM]`; `mlp.gate_up_proj.weight [2F, DM]`
  becomes `gate_proj` and `up_proj [F, DM]`. Raises ValueError naming a fused
  tensor that is missing or misshapen.
  """
  c = config
  w = checkpoint.Tensors(weights, None, "the checkpoint")
  n, kh, h = c.num_heads, c.num_kv_heads, c.head_dim
  out = dict(weights)
  for i in range(c.num_layers):
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv = w.take(attn + "qkv_proj.weight", ((n + 2 * kh) * h, c.d_model))
    gate_up = w.take(mlp + "gate_up_proj.weight", (2 * c.d_ff, c.d_model))
    del out[attn + "qkv_proj.weight"], out[mlp + "gate_up_proj.weight"]
    q, k, v = np.split(qkv, [n * h, (n + kh) * h])
    gate, up = np.split(gate_up, 2)
    out.update({
        attn + "q_proj.weight": q,
        attn + "k_proj.weight": k,
        attn + "v_proj.weight": v,
        mlp + "gate_proj.weight": gate,
        mlp + "up_proj.weight": up
    })
  return out


def load(directory: str | pathlib.Path,
         dtype=np.float32) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """Reads a Phi-3 checkpoint directory; returns (numpy params, config, hf_config).

  Args:
    directory: holds `config.json` and `model.safetensors` or the shards of
      `model.safetensors.index.json`.
    dtype: the params' numpy dtype (np.float32, or ml_dtypes.bfloat16).
  """
  return llama.load_with(directory, dtype, config_from_hf=config_from_hf,
                         params_from_hf=params_from_hf)
