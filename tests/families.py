"""Tiny Hugging Face checkpoints of the next model families, and their float64 numpy oracle.

For Qwen3, Gemma 1, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2: `FAMILIES` maps a name to a
small config.json dict, in the layout transformers 5 writes (`rope_parameters`, `layer_types`,
`dtype`), and each `<name>_v4` to the same model in the older spelling of the published Hub
checkpoints (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`,
`torch_dtype`, Gemma 1's `hidden_act: "gelu"`), which a loader must read too.
`random_weights` makes float32 tensors with exactly the Hugging Face names and shapes,
`write_checkpoint` writes them as `save_pretrained` does, and `numpy_forward` is the float64
forward of one sequence, written from transformers' modeling code; it shares no code with
kvattn.

Validated by /tmp/validate_families.py against transformers 5.25.0 and torch 2.13.0 (CPU).
Every config builds its `*ForCausalLM`; the weights load with `load_state_dict(strict=True)`
and through `from_pretrained` with no missing or unexpected key; `save_pretrained` writes the
same tensor names and shapes, and exactly these config dicts (a `_v4` spelling comes back as
its transformers 5 twin, plus the keys it carried: Phi-3's rope "type", Gemma 3's
sliding_window_pattern). Eager float64 logits of 12 tokens (longer than every window; Phi-3
LongRoPE also at 6, within its original length) match `numpy_forward` to a max abs error /
max |logit| of: qwen3 1.5e-15, qwen3_yarn 1.3e-15, gemma 6.5e-16, gemma2 2.8e-15, gemma3
6.5e-16, phi3 2.3e-15, phi3_longrope 4.1e-15, phi3_partial 2.5e-15, olmo2 5.3e-16, the same
for each `_v4`. (transformers computes RoPE angles, RMSNorm and the softmax in float32 even in
a float64 model; the script lifts those casts. Unlifted, the errors are float32's, 1e-7 to
1e-6.)

Shape legend: T tokens, D model width, N query heads, K kv heads, H head dim, R rotary dims
(H, or int(H * partial_rotary_factor) for Phi-3), F MLP width, V vocabulary.
"""

import json
import math
import pathlib

import numpy as np
from safetensors.numpy import save_file

_GEMMAS = ("gemma", "gemma2", "gemma3_text")  # [1:]: those with query_pre_attn_scalar.
# The D-wide RMSNorms of a layer, by model_type: pre-norms, plus post-norms of each sublayer's
# output (Gemma 2/3); OLMo 2 has only the post-norms.
_LAYER_NORMS = {
    "qwen3": ("input_layernorm", "post_attention_layernorm"),
    "gemma": ("input_layernorm", "post_attention_layernorm"),
    "phi3": ("input_layernorm", "post_attention_layernorm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
_LAYER_NORMS["gemma3_text"] = _LAYER_NORMS["gemma2"]
_POST_NORMS = ("gemma2", "gemma3_text", "olmo2")

_COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 63,
    "pad_token_id": 0,
    "dtype": "float32",
    # Written by save_pretrained, read by no forward:
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "transformers_version": "5.25.0",
}
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# Qwen3: Qwen2 plus q_norm/k_norm [H] on each head before RoPE; H is given (N * H != D).
# Without use_sliding_window, transformers sets sliding_window to None: no window anywhere.
QWEN3 = {
    **_COMMON, "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "num_hidden_layers": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "layer_types": ["full_attention"] * 2,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1000000.0
    }
}
# YaRN with beta_fast/beta_slow/attention_factor left to their defaults; an original length of
# 1024 puts the ramp over frequencies 1..5 of the 8: kept, blended and divided ones all occur.
QWEN3_YARN = {
    **QWEN3, "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024
    }
}
# Gemma 1: (1 + w) RMSNorm, embeddings times sqrt(D), GeGLU (tanh gelu), tied, MQA here.
GEMMA = {
    **_COMMON,
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_bidirectional_attention": None,
    "rope_parameters": _DEFAULT_ROPE,
}
# Gemma 2: four norms per layer, scale query_pre_attn_scalar**-0.5 (not H), soft caps small
# enough to bite, local layers first then alternating.
GEMMA2 = {
    **_COMMON,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "num_hidden_layers": 4,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 24,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 3.0,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "use_bidirectional_attention": None,
    "rope_parameters": _DEFAULT_ROPE,
}
# Gemma 3 text: Gemma 2 with q_norm/k_norm [H] ((1 + w), per head, before RoPE), five local
# layers per global one, RoPE per layer type (global: its own theta and scaling), no caps.
GEMMA3 = {
    **_COMMON,
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "num_hidden_layers": 6,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 20,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "sliding_window": 4,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "_sliding_window_pattern": 6,  # transformers 5 writes this private copy too.
    "use_bidirectional_attention": False,
    "rope_parameters": {
        "full_attention": {
            "rope_type": "linear",
            "factor": 8.0,
            "rope_theta": 1000000.0
        },
        "sliding_attention": {
            "rope_type": "default",
            "rope_theta": 10000.0
        }
    }
}
# Phi-3: fused qkv_proj and gate_up_proj, H = D / N, a window on every layer.
PHI3 = {
    **_COMMON, "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "sliding_window": 5,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "original_max_position_embeddings": 64,
    "rope_parameters": {
        **_DEFAULT_ROPE, "partial_rotary_factor": 1.0
    }
}
# LongRoPE (Phi-3-*-128k, Phi-3.5): short factors while T <= 8, long ones beyond; no "factor",
# so the attention factor comes from max_position_embeddings / original: sqrt(2) here.
PHI3_LONGROPE = {
    **PHI3, "sliding_window": None,
    "original_max_position_embeddings": 8,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.25, 1.5, 2.0],
        "long_factor": [1.0, 2.0, 4.0, 8.0]
    }
}
# Phi-4-mini's layout: RoPE on the first R = H / 2 dims only, LongRoPE, tied embeddings.
PHI3_PARTIAL = {
    **PHI3_LONGROPE, "tie_word_embeddings": True,
    "partial_rotary_factor": 0.5,
    "rope_parameters": {
        **PHI3_LONGROPE["rope_parameters"], "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.5],
        "long_factor": [2.0, 6.0]
    }
}
# OLMo 2: no pre-norms; post-norms on each sublayer's output; q_norm [N * H] and k_norm [K * H]
# over the whole projection, before the split into heads.
OLMO2 = {
    **_COMMON, "architectures": ["Olmo2ForCausalLM"],
    "model_type": "olmo2",
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 500000.0
    }
}


def _v4(hf: dict) -> dict:
  """The older spelling of `hf`, as the transformers 4 configs on the Hub write it."""
  new_keys = ("rope_parameters", "layer_types", "dtype", "_sliding_window_pattern",
              "use_bidirectional_attention")
  old = {k: v for k, v in hf.items() if k not in new_keys}
  old.update(torch_dtype=hf["dtype"], transformers_version="4.51.3")
  rope = hf["rope_parameters"]
  if hf["model_type"] == "gemma3_text":
    old["sliding_window_pattern"] = hf["layer_types"].index("full_attention") + 1
    old["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    rope = rope["full_attention"]
  if hf["model_type"] == "gemma":
    old["hidden_act"] = "gelu"  # The released configs' value; it means the tanh approximation.
  scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
  if hf["model_type"] == "phi3":  # Phi-3's rope_scaling says "type" and keeps the length outside.
    scaling["type"] = scaling.pop("rope_type")
    scaling.pop("original_max_position_embeddings", None)
  old["rope_theta"] = rope["rope_theta"]
  old["rope_scaling"] = None if rope["rope_type"] == "default" else scaling
  return old


FAMILIES = {
    "qwen3": QWEN3,
    "qwen3_yarn": QWEN3_YARN,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "phi3": PHI3,
    "phi3_longrope": PHI3_LONGROPE,
    "phi3_partial": PHI3_PARTIAL,
    "olmo2": OLMO2
}
FAMILIES.update({name + "_v4": _v4(hf) for name, hf in list(FAMILIES.items())})


def head_dim(hf: dict) -> int:
  """H: the config's head_dim, else D // N (Phi-3 and OLMo 2 have no head_dim key)."""
  return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def random_weights(hf: dict, seed: int = 0) -> dict:
  """Float32 tensors with the Hugging Face names and `[out, in]` shapes of `hf`'s family.

  Norm weights lie near their neutral value (0 for Gemma's (1 + w) RMSNorm, else 1); q and k
  projections are larger than the rest, so that attention is far from uniform and Gemma 2's
  caps act. A tied config has no lm_head.weight, as `save_pretrained` writes it.
  """
  rng = np.random.default_rng(seed)
  kind = hf["model_type"]
  d, v, f = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], head_dim(hf)
  neutral = 0.0 if kind in _GEMMAS else 1.0

  def normal(*shape, std=0.2):
    return (rng.standard_normal(shape) * std).astype(np.float32)

  def norm(size):
    return neutral + normal(size)

  w = {"model.embed_tokens.weight": normal(v, d, std=0.5), "model.norm.weight": norm(d)}
  if not hf["tie_word_embeddings"]:
    w["lm_head.weight"] = normal(v, d)
  for i in range(hf["num_hidden_layers"]):
    pre = f"model.layers.{i}."
    attn = {
        "q_proj": normal(n * h, d, std=0.4),
        "k_proj": normal(k * h, d, std=0.4),
        "v_proj": normal(k * h, d),
        "o_proj": normal(d, n * h)
    }
    mlp = {"gate_proj": normal(f, d), "up_proj": normal(f, d), "down_proj": normal(d, f)}
    if kind == "phi3":  # Fused: rows q | k | v, and gate | up.
      attn = {
          "qkv_proj": np.concatenate([attn["q_proj"], attn["k_proj"], attn["v_proj"]]),
          "o_proj": attn["o_proj"]
      }
      mlp = {
          "gate_up_proj": np.concatenate([mlp["gate_proj"], mlp["up_proj"]]),
          "down_proj": mlp["down_proj"]
      }
    elif hf.get("attention_bias"):
      w.update({f"{pre}self_attn.{name}.bias": normal(a.shape[0]) for name, a in attn.items()})
    w.update({f"{pre}self_attn.{name}.weight": a for name, a in attn.items()})
    w.update({f"{pre}mlp.{name}.weight": a for name, a in mlp.items()})
    w.update({f"{pre}{name}.weight": norm(d) for name in _LAYER_NORMS[kind]})
    if kind in ("qwen3", "gemma3_text"):
      w.update({pre + "self_attn.q_norm.weight": norm(h), pre + "self_attn.k_norm.weight": norm(h)})
    if kind == "olmo2":
      w.update({
          pre + "self_attn.q_norm.weight": norm(n * h),
          pre + "self_attn.k_norm.weight": norm(k * h)
      })
  return w


def write_checkpoint(directory, hf: dict, weights: dict) -> pathlib.Path:
  """model.safetensors (with `save_pretrained`'s {"format": "pt"} metadata) and config.json."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file({
      name: np.ascontiguousarray(a) for name, a in weights.items()
  }, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf, indent=2))
  return directory


def layer_types(hf: dict) -> list:
  """Each layer's "sliding_attention" (windowed) or "full_attention", as transformers 5 decides.

  Gemma 2 and 3 read `layer_types`, else Gemma 2 alternates local, global, ... and Gemma 3 makes
  every `sliding_window_pattern`-th layer (default 6) global: layers 5, 11, ... Qwen3 windows
  only with `use_sliding_window`, the layers from `max_window_layers` on (or per `layer_types`).
  Phi-3 windows every layer when `sliding_window` is set; Gemma 1 and OLMo 2 never window.
  """
  kind, count = hf["model_type"], hf["num_hidden_layers"]
  if kind == "phi3":
    return ["sliding_attention" if hf.get("sliding_window") else "full_attention"] * count
  if kind in ("gemma", "olmo2") or (kind == "qwen3" and not hf.get("use_sliding_window")):
    return ["full_attention"] * count
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  if kind == "qwen3":
    return [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(count)
    ]
  every = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", 6)
  return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(count)]


def rope_parameters(hf: dict, layer_type: str = "full_attention") -> dict:
  """The RoPE settings of one layer type, from either spelling, with transformers 5's defaults.

  Returns a dict with at least rope_type, rope_theta and partial_rotary_factor, plus
  original_max_position_embeddings for yarn and longrope. Gemma 3 nests one dict per layer
  type; in the older spelling its local layers take `rope_local_base_freq` (default 1e4) and
  plain RoPE, its global ones `rope_theta` (default 1e6) and `rope_scaling`. Phi-3 reads
  `rope_type` "su" and "yarn" as "longrope", and its top-level original_max_position_embeddings
  (default 4096) overrides the one in the dict. Only Phi-3 rotates part of a head.
  """
  kind = hf["model_type"]
  rope = hf.get("rope_parameters")
  if rope and layer_type in rope:
    rope = rope[layer_type]
  elif not rope:
    if kind == "gemma3_text" and layer_type == "sliding_attention":
      rope = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    else:
      theta = hf.get("rope_theta", 1000000.0 if kind == "gemma3_text" else 10000.0)
      rope = {"rope_theta": theta, **(hf.get("rope_scaling") or {})}
  rope = {"rope_theta": 10000.0, **rope}
  rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  rope["partial_rotary_factor"] = partial if kind == "phi3" else 1.0
  old = hf.get("original_max_position_embeddings")  # Wins over the dict's, as in transformers.
  if kind == "phi3":
    if rope["rope_type"] in ("su", "yarn"):
      rope["rope_type"] = "longrope"
    rope["original_max_position_embeddings"] = old or 4096
  elif rope["rope_type"] in ("yarn", "longrope"):
    old = old or rope.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    rope["original_max_position_embeddings"] = old
  return rope


def _yarn(hf, rope, freq, r):
  """YaRN, as transformers' `_compute_yarn_parameters`: frequencies [R/2] and attention factor."""
  base, old = rope["rope_theta"], rope["original_max_position_embeddings"]
  factor = rope.get("factor") or hf["max_position_embeddings"] / old

  def mscale(m=1):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

  scale = rope.get("attention_factor")
  if scale is None:
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    scale = mscale(m) / mscale(m_all) if m and m_all else mscale()

  def dim(rotations):  # The dim index whose wavelength turns `rotations` times in `old` tokens.
    return r * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim(rope.get("beta_fast") or 32), dim(rope.get("beta_slow") or 1)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, r - 1)
  ramp = np.clip((np.arange(r // 2) - low) / ((high - low) or 0.001), 0, 1)
  return freq / factor * ramp + freq * (1 - ramp), scale


def _longrope(hf, rope, freq, t):
  """LongRoPE, as `_compute_longrope_parameters` and its per-forward switch.

  transformers picks the long factors for the whole forward when its largest position + 1 (T
  here) exceeds original_max_position_embeddings, the short ones otherwise; the attention
  factor is the same for both.
  """
  old = rope["original_max_position_embeddings"]
  factor = rope.get("factor") or hf["max_position_embeddings"] / old
  scale = rope.get("attention_factor")
  if scale is None:
    scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
  ext = rope["long_factor"] if t > old else rope["short_factor"]
  return freq / np.asarray(ext, np.float64), scale


def rope_cos_sin(hf: dict, layer_type: str, t: int):
  """cos and sin [T, R] at positions 0..T-1, both times the rope type's attention factor."""
  rope = rope_parameters(hf, layer_type)
  r = int(head_dim(hf) * rope["partial_rotary_factor"])
  freq = rope["rope_theta"]**-(np.arange(0, r, 2) / r)  # [R/2]
  scale, kind = 1.0, rope["rope_type"]
  if kind == "linear":
    freq = freq / rope["factor"]
  elif kind == "yarn":
    freq, scale = _yarn(hf, rope, freq, r)
  elif kind == "longrope":
    freq, scale = _longrope(hf, rope, freq, t)
  elif kind != "default":
    raise ValueError(f"rope_type {kind!r} is not covered here")
  angle = np.arange(t)[:, None] * np.concatenate([freq, freq])[None]
  return np.cos(angle) * scale, np.sin(angle) * scale


def _rotate(x, cos, sin):
  """x [T, heads, H] with its first R dims rotated half-split (rotate_half), the rest kept."""
  r = cos.shape[-1]
  rot, rest = x[..., :r], x[..., r:]
  half = np.concatenate([-rot[..., r // 2:], rot[..., :r // 2]], -1)
  return np.concatenate([rot * cos[:, None] + half * sin[:, None], rest], -1)


def _act(hf, x):
  kind = hf["model_type"]
  name = hf.get("hidden_activation") if kind in _GEMMAS[1:] else hf.get("hidden_act")
  if kind == "gemma" or name == "gelu_pytorch_tanh":  # Gemma 1 reads "gelu" as the tanh form.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  if name == "silu":
    return x / (1 + np.exp(-x))
  raise ValueError(f"activation {name!r} is not covered here")


def numpy_forward(hf: dict, weights: dict, ids) -> np.ndarray:
  """Float64 logits [T, V] of one sequence of token ids [T] at positions 0..T-1.

  Per layer: x += [post-norm](attention(pre-norm(x))), then x += [post-norm](MLP(pre-norm(x))),
  pre-norms per `_LAYER_NORMS` (none in OLMo 2; Gemma 2/3 use pre_feedforward_layernorm before
  the MLP, the others post_attention_layernorm). RMSNorm is x / sqrt(mean(x^2) + eps) times w,
  or (1 + w) in the Gemmas. Gemma scales embeddings by sqrt(D) (transformers first rounds
  sqrt(D) to the weights' dtype, e.g. 5.65625 for sqrt(32) in bfloat16: no matter in float64).
  Attention: q/k norm (Qwen3, Gemma 3: per head [H]; OLMo 2: whole projection, before heads),
  then RoPE, scores times query_pre_attn_scalar**-0.5 (Gemma 2/3) or H**-0.5, Gemma 2's cap
  c * tanh(s / c) before the mask (Gemma 3 has the key but transformers ignores it), causal mask
  and, on sliding layers, key j allowed for query i only if i - j < sliding_window. MLP:
  down(act(gate(x)) * up(x)), SiLU or tanh GELU (Gemma). Then final norm, unembedding (the
  embedding if tied), and final_logit_softcapping where set (Gemma 2, and 3 if not null).
  """
  w = {name: np.asarray(a, np.float64) for name, a in weights.items()}
  kind = hf["model_type"]
  if kind not in _LAYER_NORMS:
    raise ValueError(f"model_type {kind!r} is not one of {sorted(_LAYER_NORMS)}")
  d, n, k, h = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], head_dim(hf)
  ids = np.asarray(ids)
  t, eps = len(ids), hf["rms_norm_eps"]

  def norm(x, name):
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return y * (1 + w[name + ".weight"]) if kind in _GEMMAS else y * w[name + ".weight"]

  def linear(x, name):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y

  def cap(x, c):
    return x if c is None else c * np.tanh(x / c)

  x = w["model.embed_tokens.weight"][ids]
  if kind in _GEMMAS:
    x = x * math.sqrt(d)
  rows, cols = np.arange(t)[:, None], np.arange(t)[None]  # query i, key j
  for i, layer_type in enumerate(layer_types(hf)):
    pre = f"model.layers.{i}."
    a = x if kind == "olmo2" else norm(x, pre + "input_layernorm")
    if kind == "phi3":
      q, key, v = np.split(linear(a, pre + "self_attn.qkv_proj"), [n * h, (n + k) * h], -1)
    else:
      q, key, v = (linear(a, f"{pre}self_attn.{s}_proj") for s in "qkv")
    if kind == "olmo2":
      q, key = norm(q, pre + "self_attn.q_norm"), norm(key, pre + "self_attn.k_norm")
    q, key, v = q.reshape(t, n, h), key.reshape(t, k, h), v.reshape(t, k, h)
    if kind in ("qwen3", "gemma3_text"):
      q, key = norm(q, pre + "self_attn.q_norm"), norm(key, pre + "self_attn.k_norm")
    cos, sin = rope_cos_sin(hf, layer_type, t)
    q, key = _rotate(q, cos, sin), _rotate(key, cos, sin)
    key, v = np.repeat(key, n // k, axis=1), np.repeat(v, n // k, axis=1)
    scale = hf["query_pre_attn_scalar"]**-0.5 if kind in _GEMMAS[1:] else h**-0.5
    scores = np.einsum("inh,jnh->nij", q, key) * scale
    if kind == "gemma2":
      scores = cap(scores, hf.get("attn_logit_softcapping"))
    allowed = cols <= rows
    if layer_type == "sliding_attention":
      allowed &= rows - cols < hf["sliding_window"]
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = linear(np.einsum("nij,jnh->inh", probs, v).reshape(t, n * h), pre + "self_attn.o_proj")
    x = x + (norm(o, pre + "post_attention_layernorm") if kind in _POST_NORMS else o)
    pre_mlp = "pre_feedforward_layernorm" if kind in _GEMMAS[1:] else "post_attention_layernorm"
    m = x if kind == "olmo2" else norm(x, pre + pre_mlp)
    if kind == "phi3":
      gate, up = np.split(linear(m, pre + "mlp.gate_up_proj"), 2, -1)
    else:
      gate, up = linear(m, pre + "mlp.gate_proj"), linear(m, pre + "mlp.up_proj")
    m = linear(_act(hf, gate) * up, pre + "mlp.down_proj")
    x = x + (norm(m, pre + "post_feedforward_layernorm") if kind in _POST_NORMS else m)
  x = norm(x, "model.norm")
  tied = hf.get("tie_word_embeddings", kind in _GEMMAS)
  logits = x @ w["model.embed_tokens.weight" if tied else "lm_head.weight"].T
  return cap(logits, hf.get("final_logit_softcapping"))
