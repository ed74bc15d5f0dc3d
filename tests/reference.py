"""Float64 numpy reference for cached attention: the oracle the tests trust.

It knows nothing of caches. Each row's real tokens are taken out of the
padded layout and run as one plain sequence with an explicit mask, so it is an
independent route to the same numbers.

Shape legend: B batch, T tokens, DM model width, N query heads, K kv heads,
H head dim, G = N // K.
"""

from __future__ import annotations

import math

import numpy as np


def rope_frequencies(h: int, base: float, scaling: dict | None = None,
                     seq_len: int | None = None) -> np.ndarray:
  """Float64 RoPE frequencies [H/2]; `scaling` as Hugging Face's `rope_scaling` dict.

  `h` is the number of rotated features. One frequency at a time, as the papers
  state the rules: Llama 3.1's by wavelength bands; YaRN's (transformers'
  variant) by the index where a pair turns beta_fast or beta_slow times in the
  original context; LongRoPE's by the per-pair factor, long ones when
  `seq_len` exceeds the original context, short ones otherwise (or without
  `seq_len`). The dict needs `factor` and `original_max_position_embeddings`
  for "yarn" and "longrope" (no defaults taken from a whole config here).
  """
  freqs = [base**(-2 * i / h) for i in range(h // 2)]
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  if kind is None:
    return np.array(freqs)
  if kind == "linear":
    return np.array(freqs) / scaling["factor"]
  if kind == "yarn":
    return np.array(_yarn_frequencies(freqs, h, base, scaling))
  if kind == "longrope":
    long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
    ext = scaling["long_factor" if long else "short_factor"]
    assert len(ext) == h // 2, (len(ext), h)
    return np.array([freq / e for freq, e in zip(freqs, ext)])
  factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old = scaling["original_max_position_embeddings"]
  out = []
  for freq in freqs:
    wavelength = 2 * math.pi / freq
    if wavelength < old / high:  # High frequency: kept.
      out.append(freq)
    elif wavelength > old / low:  # Low frequency: divided by the factor.
      out.append(freq / factor)
    else:  # Between: a blend of the two.
      smooth = (old / wavelength - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def _yarn_frequencies(freqs: list[float], h: int, base: float, scaling: dict) -> list[float]:
  """YaRN: pair i blends freq (kept) and freq / factor by a ramp linear in i."""
  old, factor = scaling["original_max_position_embeddings"], scaling["factor"]

  # Pair i turns old * freq_i / (2 pi) times over the original context; solve that for i.
  def index_turning(times):
    return h / 2 * math.log(old / (2 * math.pi * times)) / math.log(base)

  first = index_turning(scaling.get("beta_fast") or 32)  # Turns often: kept up to here.
  last = index_turning(scaling.get("beta_slow") or 1)  # Turns rarely: divided from here.
  if scaling.get("truncate", True):
    first, last = math.floor(first), math.ceil(last)
  first, last = max(first, 0), min(last, h - 1)
  if first == last:
    last += 0.001
  out = []
  for i, freq in enumerate(freqs):
    ramp = min(max((i - first) / (last - first), 0.0), 1.0)
    out.append(ramp * freq / factor + (1 - ramp) * freq)
  return out


def rope_attention_factor(scaling: dict | None) -> float:
  """The factor of cos and sin (1 but for "yarn" and "longrope"), from the papers' formulas."""
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  if kind not in ("yarn", "longrope"):
    return 1.0
  if scaling.get("attention_factor") is not None:
    return scaling["attention_factor"]
  s = scaling["factor"]
  if s <= 1:
    return 1.0
  if kind == "longrope":
    return math.sqrt(1 + math.log(s) / math.log(scaling["original_max_position_embeddings"]))
  m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if m and m_all:  # DeepSeek's variant.
    return (0.1 * m * math.log(s) + 1) / (0.1 * m_all * math.log(s) + 1)
  return 0.1 * math.log(s) + 1


def rope(x: np.ndarray, positions: np.ndarray, base: float, scaling: dict | None = None,
         rotary_dim: int | None = None, seq_len: int | None = None) -> np.ndarray:
  """x [L, M, H] rotated at integer positions [L], half-split layout, float64.

  The first `rotary_dim` features (all H if None) are rotated, feature i with
  i + rotary_dim/2, and multiplied by the attention factor; the rest are copied.
  LongRoPE picks its factors from `seq_len`, the whole call's largest position
  + 1 (over every row of a batch); None: max(positions) + 1.
  """
  r = x.shape[-1] if rotary_dim is None else rotary_dim
  seq_len = int(np.max(positions)) + 1 if seq_len is None else seq_len
  inv_freq = rope_frequencies(r, base, scaling, seq_len)
  angle = positions[:, None, None].astype(np.float64) * inv_freq
  cos, sin = (f(angle) * rope_attention_factor(scaling) for f in (np.cos, np.sin))
  x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def attention(q, k, v, allowed, scale=None, softcap=None):
  """q [L, N, H], k/v [L, K, H], allowed bool [L, L] -> [L, N, H], float64.

  Rows with nothing allowed give zeros. Logits are scaled by `scale` (None:
  1/sqrt(H)), then soft-capped to `softcap * tanh(logit / softcap)` if given.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n, kh = q.shape[1], k.shape[1]
  k = np.repeat(k, n // kh, axis=1)  # GQA: query head n uses kv head n // G.
  v = np.repeat(v, n // kh, axis=1)
  logits = np.einsum("inh,jnh->nij", q, k) * (q.shape[-1]**-0.5 if scale is None else scale)
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  logits = np.where(allowed[None], logits, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(allowed[None], np.exp(logits - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1.0, denom)
  return np.einsum("nij,jnh->inh", p, v)


def attention_by_rows(q, k, v, mask, chunk_ids, prefix_lm=False, scale=None, softcap=None):
  """q [B, T, N, H], k/v [B, T, K, H] with padding -> [B, T, N, H] float64.

  Each row's real tokens (mask [B, T]) run as one sequence; chunk_ids [T]
  is the call each token was fed in (see `allowed_mask`). Padding gives zeros.
  """
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    idx = np.nonzero(np.asarray(mask[b]))[0]
    if idx.size:
      allowed = allowed_mask(np.asarray(chunk_ids)[idx], prefix_lm)
      out[b, idx] = attention(q[b, idx], k[b, idx], v[b, idx], allowed, scale, softcap)
  return out


def attention_by_calls(q, k, v, mask, sizes, max_len: int, prefix_lm: bool = False):
  """What feeding the tokens to a cache of max_len slots, in calls of `sizes`, must give.

  Models the cache's rules independently: a call fits if the slots written so
  far plus its T fit in max_len and no call has overflowed before; a call that
  does not fit writes nothing (and neither does any later call), yet its
  queries still attend to everything written plus the call's own tokens.
  Within a call, tokens see each other causally (both ways with prefix_lm);
  padding (mask False) is never attended to and gives zeros.

  Returns:
    (out [B, total, N, H] float64, written: tokens written, overflowed: bool).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  mask = np.asarray(mask)
  out = np.zeros(q.shape, np.float64)
  written, overflowed, lo = 0, False, 0
  for size in sizes:
    hi = lo + size
    for b in range(q.shape[0]):
      old = [i for i in range(written) if mask[b, i]]
      new = [i for i in range(lo, hi) if mask[b, i]]
      if not new:
        continue
      keys = np.array(old + new)
      queries = np.array(new)
      allowed = (keys[None, :] < written) | (keys[None, :] <= queries[:, None]) | prefix_lm
      out[b, queries] = attention(q[b, queries], k[b, keys], v[b, keys], allowed)
    if not overflowed and written + size <= max_len:
      written = hi
    else:
      overflowed = True
    lo = hi
  return out, written, overflowed


def stored(cache, name: str, total: int) -> np.ndarray:
  """The first `total` slots of a cache's keys ("k") or values ("v") as float64.

  What a cache holds, read back: cast to its dtype, or int8 times the scale of
  each vector. The reference takes these, so a comparison measures the
  kernel's own rounding, not the storage's.
  """
  x = np.asarray(getattr(cache, name)[:, :total]).astype(np.float64)
  scale = getattr(cache, name + "_scale")
  if scale is not None:
    x = x * np.asarray(scale[:, :total], np.float64)[..., None]
  return x


def new_cache(batch, max_len, num_kv_heads, head_dim, dtype: str):
  """An empty kvattn cache of storage dtype "float32", "bfloat16", "float16" or "int8"."""
  import kvattn  # The oracle itself never touches kvattn; only this helper does.
  if dtype == "int8":
    return kvattn.init_cache(batch, max_len, num_kv_heads, head_dim, quantized=True)
  return kvattn.init_cache(batch, max_len, num_kv_heads, head_dim, dtype)


def three_row_mask(total: int) -> np.ndarray:
  """Three rows: full, left-padded by 3, with holes (every third token): bool [3, total]."""
  pos = np.arange(total)
  return np.stack([pos >= 0, pos >= 3, pos % 3 != 1])


def ragged_mask(lengths, width: int, left_pad: bool) -> np.ndarray:
  """bool [B, width], lengths[b] real tokens per row, padded on the left or the right."""
  pos = np.arange(width)[None, :]
  lengths = np.asarray(lengths)[:, None]
  return pos >= width - lengths if left_pad else pos < lengths


def allowed_mask(chunk_ids: np.ndarray, prefix_lm: bool) -> np.ndarray:
  """[L, L]: causal, plus (with prefix_lm) both ways within the same chunk."""
  i = np.arange(len(chunk_ids))
  allowed = i[None, :] <= i[:, None]
  if prefix_lm:
    allowed |= chunk_ids[None, :] == chunk_ids[:, None]
  return allowed


def layer(params, x, mask, chunk_ids, *, prefix_lm=False, rope_base=None, window=None,
          rotary_dim=None, scale=None, softcap=None, qk_norm_eps=1e-6):
  """The attention layer over whole sequences, without a cache.

  Args:
    params: dict of arrays (wq, wk, wv, wo and optional biases).
    x: [B, T, DM]; mask: bool [B, T] real tokens; chunk_ids: int [T], the
      call (prefill chunk or decode step) each time step was fed in.
    prefix_lm: tokens fed in the same call see each other.
    rope_base: None or the RoPE base.
    window: None, or W: a token at position p sees positions p - W + 1 .. p
      only (positions count the row's real tokens).
    rotary_dim: None, or R: RoPE on the first R features of each head only.
    scale, softcap: the logits' scale and soft cap (`attention`).
    qk_norm_eps: with q_norm/k_norm ([H], per head) or q_norm_proj/k_norm_proj
      ([heads, H], over the whole projection) in params: RMSNorm of q and k
      with those scales before RoPE.

  Returns:
    [B, T, DM] float64, zeros at padding.
  """
  p = {name: np.asarray(a, np.float64) for name, a in params.items()}
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape, np.float64)
  for b in range(x.shape[0]):
    idx = np.nonzero(np.asarray(mask[b]))[0]
    if idx.size == 0:
      continue
    xs = x[b, idx]
    q = np.einsum("ld,dnh->lnh", xs, p["wq"]) + p.get("bq", 0.0)
    k = np.einsum("ld,dnh->lnh", xs, p["wk"]) + p.get("bk", 0.0)
    v = np.einsum("ld,dnh->lnh", xs, p["wv"]) + p.get("bv", 0.0)
    for name, axes in (("_norm", (-1,)), ("_norm_proj", (-2, -1))):
      if "q" + name in p:
        q = q / np.sqrt(np.mean(q * q, axis=axes, keepdims=True) + qk_norm_eps) * p["q" + name]
        k = k / np.sqrt(np.mean(k * k, axis=axes, keepdims=True) + qk_norm_eps) * p["k" + name]
    if rope_base is not None:
      pos = np.arange(idx.size)
      q = rope(q, pos, rope_base, rotary_dim=rotary_dim)
      k = rope(k, pos, rope_base, rotary_dim=rotary_dim)
    allowed = allowed_mask(np.asarray(chunk_ids)[idx], prefix_lm)
    if window is not None:
      pos = np.arange(idx.size)
      allowed = allowed & (pos[None, :] > pos[:, None] - window)
    o = attention(q, k, v, allowed, scale, softcap)
    out[b, idx] = np.einsum("lnh,nhd->ld", o, p["wo"]) + p.get("bo", 0.0)
  return out
