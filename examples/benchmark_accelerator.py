"""The accelerator tables of examples/benchmark.py: kvattn against what a GPU user has.

In one process, side by side, on whatever device is present (B=8, N=32,
K in {32, 8}, H=128, bfloat16, S=8192, prompt 2048 by default):

  1. The decode kernel (`cached_attention` with T=1) of every implementation
     at fills 64 / 2048 / 8128: ms, GB/s of filled K+V, and that as a % of
     the device's measured copy bandwidth and of its HBM spec.
  2. The decode step (`decode_step`, projections included) against a
     whole-cache einsum step (the way Flax linen decodes: write the token,
     attend over all S slots with a mask).
  3. Prefill: the kernel at index 0 against `jax.nn.dot_product_attention`
     (XLA, and cuDNN on GPU), and the layer against its full causal forward
     written as one masked einsum.
  4. The goals of the GPU issue, met or not.

Shape legend: B batch, T prompt, S = max_len, DM model width, N query heads,
K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax

from examples import timing
import kvattn

# HBM bandwidth from the vendor's spec sheet, bytes/s, by device_kind prefix.
HBM_SPEC = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12}


def hbm_spec(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((bw for name, bw in HBM_SPEC.items() if kind.startswith(name)), None)


def random_cache(b, s, kh, h, fill, dtype, seed=0) -> kvattn.KVCache:
  """A cache of random keys and values (drawn on the device) whose first `fill` slots are valid."""
  cache = kvattn.init_cache(b, s, kh, h, dtype)
  kk, kv = jax.random.split(jax.random.key(seed))
  return cache._replace(k=jax.random.normal(kk, cache.k.shape,
                                            dtype), v=jax.random.normal(kv, cache.v.shape, dtype),
                        valid=jnp.broadcast_to(jnp.arange(s)[None] < fill, (b, s)),
                        lengths=jnp.full((b,), fill, jnp.int32), index=jnp.asarray(fill, jnp.int32))


def einsum_decode_step(params, k_cache, v_cache, x, index):
  """One token through the layer the way Flax linen decodes: whole-cache attention.

  Writes the token's k and v at `index`, then attends over all S slots with a
  mask `slot <= index`. Returns (out [B, 1, DM], k_cache, v_cache).
  """
  b, _, _ = x.shape
  _, n, h = params["wq"].shape
  kh = params["wk"].shape[1]
  q = jnp.einsum("BTD,DNH->BTNH", x, params["wq"]).reshape(b, 1, kh, n // kh, h)
  k = jnp.einsum("BTD,DKH->BTKH", x, params["wk"]).astype(k_cache.dtype)
  v = jnp.einsum("BTD,DKH->BTKH", x, params["wv"]).astype(v_cache.dtype)
  k_cache = lax.dynamic_update_slice_in_dim(k_cache, k, index, axis=1)
  v_cache = lax.dynamic_update_slice_in_dim(v_cache, v, index, axis=1)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.astype(k_cache.dtype), k_cache,
                      preferred_element_type=jnp.float32) * h**-0.5
  seen = jnp.arange(k_cache.shape[1]) <= index
  probs = jax.nn.softmax(jnp.where(seen, logits, jnp.finfo(jnp.float32).min), axis=-1)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_cache.dtype), v_cache,
                 preferred_element_type=jnp.float32)
  out = jnp.einsum("BTNH,NHD->BTD", o.reshape(b, 1, n, h).astype(x.dtype), params["wo"])
  return out, k_cache, v_cache


def tables(cfg, fills, rounds, copy_gbs) -> list[tuple]:
  """Prints the accelerator tables; returns the goals as (name, measured, bound).

  Args:
    cfg: (B, N, Ks, H, S, T, dtype) with Ks a tuple of kv head counts.
    fills: decode fills.
    rounds: timing rounds.
    copy_gbs: the device's measured copy bandwidth (read + write), GB/s.
  """
  b, n, kv_heads, h, s, t, dtype = cfg
  device = jax.devices()[0]
  spec = hbm_spec(device)
  implementations = sorted(kvattn.attention.BACKENDS)
  goals = []
  for kh in kv_heads:
    goals += _decode_kernel_table(b, n, kh, h, s, fills, dtype, rounds, copy_gbs, spec,
                                  implementations)
  goals += _decode_step_table(b, n, kv_heads[0], h, s, fills, dtype, rounds, implementations)
  goals += _prefill_table(b, n, kv_heads[0], h, s, t, dtype, rounds, implementations)
  return goals


def _decode_kernel_table(b, n, kh, h, s, fills, dtype, rounds, copy_gbs, spec, implementations):
  q = jax.random.normal(jax.random.key(2), (b, 1, n, h), dtype)
  kv = q[:, :, :kh]
  cases = {}
  for impl in implementations:
    kernel = jax.jit(functools.partial(_kernel_call, implementation=impl), donate_argnums=3)
    for fill in fills:
      cases[(impl, fill)] = timing.donated_calls(kernel, random_cache(b, s, kh, h, fill, dtype), q,
                                                 kv, kv, index=fill)
  times = timing.time_interleaved(cases, rounds)
  name = jnp.dtype(dtype).name
  print(f"\n## Decode kernel (`cached_attention`, T=1), B={b}, N={n}, K={kh}, H={h}, "
        f"S={s}, {name}\n")
  spec_text = f"{spec / 1e9:.0f} GB/s" if spec else "unknown for this device"
  print(f"GB/s: bytes of filled K+V over the time. Copy: this device's measured copy "
        f"bandwidth, {copy_gbs:.0f} GB/s (read + write). HBM spec: {spec_text}.\n")
  print("| implementation | fill | ms | GB/s | % of copy | % of HBM spec |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  goals = []
  for impl in implementations:
    for fill in fills:
      ms = times[(impl, fill)][0]
      gbs = fill * b * kh * h * jnp.dtype(dtype).itemsize * 2 / ms / 1e6
      of_spec = f"{100 * gbs * 1e9 / spec:.0f}" if spec else "-"
      print(f"| {impl} | {fill} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f} | "
            f"{of_spec} |")
      if spec and fill >= 2048:
        goals.append((f"{impl} decode kernel K={kh} fill {fill}: share of HBM spec >= 0.7",
                      gbs * 1e9 / spec, 0.7, ">="))
  return goals


def _kernel_call(q, k, v, cache, *, implementation):
  return kvattn.cached_attention(q, k, v, cache, implementation=implementation)


def _decode_step_table(b, n, kh, h, s, fills, dtype, rounds, implementations):
  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h, dtype=dtype)
  x = jax.random.normal(jax.random.key(3), (b, 1, dm), dtype)
  cases = {}
  for impl in implementations:
    step = jax.jit(functools.partial(_step_call, implementation=impl), donate_argnums=2)
    for fill in fills:
      cases[(impl, fill)] = timing.donated_calls(step, random_cache(b, s, kh, h, fill, dtype),
                                                 params, x, index=fill)
  einsum = jax.jit(einsum_decode_step, donate_argnums=(1, 2))
  for fill in fills:
    cache = random_cache(b, s, kh, h, fill, dtype)
    state = {"k": cache.k, "v": cache.v}

    def run(state=state, fill=fill):
      out, state["k"], state["v"] = einsum(params, state["k"], state["v"], x, fill)
      return out

    cases[("einsum", fill)] = timing.Stateful(run)
  times = timing.time_interleaved(cases, rounds)
  print(f"\n## Decode step (`decode_step`, projections included) vs a whole-cache einsum "
        f"step (Flax's way), B={b}, N={n}, K={kh}, H={h}, S={s}, {jnp.dtype(dtype).name}\n")
  print("| fill | " + " | ".join(f"{impl} ms" for impl in implementations) + " | einsum ms | " +
        " | ".join(f"{impl} / einsum" for impl in implementations) + " |")
  print("| ---: |" + " ---: |" * (2 * len(implementations) + 1))
  goals = []
  for fill in fills:
    base = times[("einsum", fill)][0]
    ratios = [times[(impl, fill)][0] / base for impl in implementations]
    print(f"| {fill} | " + " | ".join(f"{times[(impl, fill)][0]:.3f}" for impl in implementations) +
          f" | {base:.3f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    bound = {64: 0.15, 2048: 0.35}.get(fill)
    if bound:
      goals += [(f"{impl} decode step fill {fill} <= {bound}x the einsum step", r, bound)
                for impl, r in zip(implementations, ratios)]
  return goals


def _step_call(params, x, cache, *, implementation):
  return kvattn.decode_step(params, cache, x, implementation=implementation)


def _prefill_call(params, x, cache, *, implementation):
  return kvattn.prefill(params, cache, x, implementation=implementation)


def einsum_forward(params, x):
  """The layer's full causal forward as one masked einsum (XLA attention), no cache."""
  b, t, _ = x.shape
  _, n, h = params["wq"].shape
  kh = params["wk"].shape[1]
  q = jnp.einsum("BTD,DNH->BTNH", x, params["wq"]).reshape(b, t, kh, n // kh, h)
  k = jnp.einsum("BTD,DKH->BTKH", x, params["wk"])
  v = jnp.einsum("BTD,DKH->BTKH", x, params["wv"])
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * h**-0.5
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  probs = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
  return jnp.einsum("BTNH,NHD->BTD", o.reshape(b, t, n, h), params["wo"])


def _prefill_table(b, n, kh, h, s, t, dtype, rounds, implementations):
  keys = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, t, kh, h), dtype)
  v = jax.random.normal(keys[2], (b, t, kh, h), dtype)
  cases = {}
  for impl in implementations:
    kernel = jax.jit(functools.partial(_kernel_call, implementation=impl), donate_argnums=3)
    cases[f"kvattn {impl}"] = timing.donated_calls(kernel, kvattn.init_cache(b, s, kh, h, dtype), q,
                                                   k, v, index=0)
  dpa = {
      "xla": jax.jit(
          functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla"))
  }
  if jax.devices()[0].platform == "gpu":
    dpa["cudnn"] = jax.jit(
        functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"))
  for name, fn in dpa.items():
    cases[f"jax.nn.dot_product_attention {name}"] = timing.Stateful(functools.partial(fn, q, k, v))
  dm = n * h
  params = kvattn.init_params(jax.random.key(0), dm, n, num_kv_heads=kh, head_dim=h, dtype=dtype)
  x = jax.random.normal(jax.random.key(5), (b, t, dm), dtype)
  for impl in implementations:
    layer = jax.jit(functools.partial(_prefill_call, implementation=impl), donate_argnums=2)
    cases[f"kvattn.prefill layer, {impl}"] = timing.donated_calls(
        layer, kvattn.init_cache(b, s, kh, h, dtype), params, x, index=0)
  forward = jax.jit(einsum_forward)
  cases["full causal forward, one masked einsum"] = timing.Stateful(
      functools.partial(forward, params, x))
  times = timing.time_interleaved(cases, rounds)
  print(f"\n## Prefill at index 0, T={t}, B={b}, N={n}, K={kh}, H={h}, "
        f"{jnp.dtype(dtype).name}: kernel, then layer\n")
  print("| what | ms |")
  print("| --- | ---: |")
  for name, (ms, _) in times.items():
    print(f"| {name} | {ms:.3f} |")
  goals = []
  if "jax.nn.dot_product_attention cudnn" in times:
    base = times["jax.nn.dot_product_attention cudnn"][0]
    goals += [(f"{impl} kernel prefill <= 1.25x cuDNN", times[f"kvattn {impl}"][0] / base, 1.25)
              for impl in implementations]
  base = times["full causal forward, one masked einsum"][0]
  goals += [(f"{impl} layer prefill <= 0.8x the masked-einsum forward",
             times[f"kvattn.prefill layer, {impl}"][0] / base, 0.8) for impl in implementations]
  return goals
