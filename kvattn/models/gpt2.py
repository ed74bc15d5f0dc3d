"""GPT-2 checkpoints in the Hugging Face layout, mapped onto `kvattn.models.transformer`.

Weights are memory-mapped and read with numpy (no torch; see
`kvattn.models.checkpoint`). GPT-2's Conv1D weights are already `[in, out]`;
the fused `c_attn` is split into wq, wk, wv; positions are learned, the MLP
uses GELU tanh, a final LayerNorm precedes the unembedding, which is tied to
`wte`. `kvattn.models.load` picks this loader for `GPT2LMHeadModel`.

Shape legend:
  L: number of layers
  V: vocabulary size
  MP: number of learned positions
  DM: model width
  F: MLP hidden width
  N: number of heads
  H: head dimension
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from kvattn.models import checkpoint
from kvattn.models import transformer

ARCHITECTURES = ("GPT2LMHeadModel",)
# config.json's model_type -> the class it stands for, as transformers maps them.
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}


def config_from_hf(hf: dict[str, Any]) -> transformer.Config:
  """Maps a GPT-2 `config.json` onto the transformer's `Config`."""
  checkpoint.architecture(hf, MODEL_TYPES, "gpt2.load")  # Or a ValueError naming the one found.
  dm, n = hf["n_embd"], hf["n_head"]
  if dm % n:
    raise ValueError(f"config.json: n_embd={dm} should be a multiple of n_head={n}")
  activation = {
      "gelu_new": "gelu_tanh",
      "gelu_pytorch_tanh": "gelu_tanh",
      "gelu": "gelu",
      "relu": "relu"
  }.get(hf.get("activation_function", "gelu_new"))
  if activation is None:
    raise ValueError(f"config.json: unsupported activation_function "
                     f"{hf['activation_function']!r}")
  if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
    raise ValueError("config.json: only the standard 1/sqrt(H) attention scale is supported")
  return transformer.Config(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], d_model=dm,
                            num_heads=n, num_kv_heads=n, head_dim=dm // n, d_ff=hf.get("n_inner")
                            or 4 * dm, max_positions=hf["n_positions"], rope_base=None,
                            tie_embeddings=True, activation=activation, use_bias=True,
                            norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def params_from_hf(weights: dict[str, np.ndarray], config: transformer.Config,
                   dtype=np.float32) -> transformer.Params:
  """Maps GPT-2 weights (names with or without the "transformer." prefix) to params.

  GPT-2's Conv1D weights are already `[in, out]`. The fused `c_attn` `[DM, 3 DM]`
  splits into wq, wk, wv `[DM, N, H]`; `c_proj` `[N H, DM]` becomes wo
  `[N, H, DM]`. The unembedding is tied to `wte`. `dtype` is the params'
  numpy dtype, e.g. np.float32 or ml_dtypes.bfloat16.
  """
  w = checkpoint.Tensors({
      name.removeprefix("transformer."): a for name, a in weights.items()
  }, dtype, "model.safetensors")
  get = w.take
  dm, n, h = config.d_model, config.num_heads, config.head_dim

  def layer(i):
    pre = f"h.{i}."
    qkv = get(pre + "attn.c_attn.weight", (dm, 3 * dm))
    qkv_b = get(pre + "attn.c_attn.bias", (3 * dm,))
    wq, wk, wv = (a.reshape(dm, n, h) for a in np.split(qkv, 3, axis=1))
    bq, bk, bv = (a.reshape(n, h) for a in np.split(qkv_b, 3))
    return {
        "ln1": {
            "scale": get(pre + "ln_1.weight", (dm,)),
            "bias": get(pre + "ln_1.bias", (dm,))
        },
        "attn": {
            "wq": wq,
            "wk": wk,
            "wv": wv,
            "bq": bq,
            "bk": bk,
            "bv": bv,
            "wo": get(pre + "attn.c_proj.weight", (dm, dm)).reshape(n, h, dm),
            "bo": get(pre + "attn.c_proj.bias", (dm,))
        },
        "ln2": {
            "scale": get(pre + "ln_2.weight", (dm,)),
            "bias": get(pre + "ln_2.bias", (dm,))
        },
        "mlp": {
            "w_in": get(pre + "mlp.c_fc.weight", (dm, config.d_ff)),
            "b_in": get(pre + "mlp.c_fc.bias", (config.d_ff,)),
            "w_out": get(pre + "mlp.c_proj.weight", (config.d_ff, dm)),
            "b_out": get(pre + "mlp.c_proj.bias", (dm,))
        },
    }

  # Views of the file until here: the stacking and `w.own` copy each tensor once.
  layers = [layer(i) for i in range(config.num_layers)]
  stacked = checkpoint.tree_stack(layers, w.dtype)
  return {
      "embed": w.own(get("wte.weight", (config.vocab_size, dm))),
      "pos_embed": w.own(get("wpe.weight", (config.max_positions, dm))),
      "layers": stacked,
      "ln_f": {
          "scale": w.own(get("ln_f.weight", (dm,))),
          "bias": w.own(get("ln_f.bias", (dm,)))
      },
  }


def load(directory: str | pathlib.Path,
         dtype=np.float32) -> tuple[transformer.Params, transformer.Config, dict[str, Any]]:
  """Reads a checkpoint directory; returns (numpy params, config, hf_config).

  Args:
    directory: holds `config.json` and `model.safetensors` or the shards of
      `model.safetensors.index.json`.
    dtype: the params' numpy dtype (np.float32, or ml_dtypes.bfloat16 to halve
      their memory).
  """
  hf = checkpoint.read_config(directory)
  config = config_from_hf(hf)
  return params_from_hf(checkpoint.read_tensors(directory), config, dtype), config, hf
