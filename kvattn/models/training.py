"""Training the character-level LM with plain JAX: corpus, loss, Adam, loop.

The corpus is every machine's Python standard library: the `.py` files under
`sysconfig.get_paths()["stdlib"]` (tests and site-packages left out). The loss
is next-character cross-entropy of `transformer.forward`; the optimizer a
hand-written AdamW with warmup and cosine decay.

Shape legend:
  B: batch size
  T: sequence length (characters)
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvattn.models import transformer

_SKIPPED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3",
    "__pycache__"
})


def read_corpus(root: str | None = None, max_chars: int | None = None) -> str:
  """The `.py` sources under `root` (default: the standard library), sorted by path."""
  root = root or sysconfig.get_paths()["stdlib"]
  texts = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
    for name in sorted(files):
      if name.endswith(".py"):
        texts.append(pathlib.Path(directory, name).read_text(encoding="utf-8", errors="replace"))
  if not texts:
    raise ValueError(f"no .py files under {root}")
  text = "\n\n".join(texts)
  return text[:max_chars] if max_chars else text


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """Random windows of the corpus: int32 `[B, T + 1]` (inputs and shifted targets)."""
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  return data[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def loss_fn(params: transformer.Params, batch: jax.Array, config: transformer.Config):
  """Mean next-character cross-entropy (nats) of `batch [B, T + 1]`."""
  logits = transformer.forward(params, batch[:, :-1], config=config)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


class AdamState(NamedTuple):
  step: jax.Array  # [] int32
  mu: Any  # like params
  nu: Any  # like params


def adam_init(params) -> AdamState:
  return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                   jax.tree.map(jnp.zeros_like, params))


def adam_update(params, grads, state: AdamState, lr, *, b1=0.9, b2=0.99, eps=1e-8,
                weight_decay=0.0):
  """One AdamW step (decoupled weight decay on matrices only); returns (params, state)."""
  step = state.step + 1
  mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
  c1 = 1 - b1**step.astype(jnp.float32)
  c2 = 1 - b2**step.astype(jnp.float32)

  def update(p, m, v):
    decay = weight_decay * p if p.ndim >= 2 else 0.0
    return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + decay)

  return jax.tree.map(update, params, mu, nu), AdamState(step, mu, nu)


def learning_rate(progress, peak: float, warmup: float = 0.05):
  """Linear warmup to `peak` over the first `warmup` of training, then cosine to peak / 10.

  `progress` in [0, 1] is the fraction of training done: of the steps or of the
  time budget, whichever runs out first, so the schedule always completes.
  """
  progress = jnp.asarray(progress, jnp.float32)
  frac = jnp.clip((progress - warmup) / (1 - warmup), 0.0, 1.0)
  cosine = peak * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * frac)))
  return jnp.where(progress < warmup, peak * progress / warmup, cosine)


def make_train_step(config: transformer.Config, peak_lr: float):
  """Returns a jitted `(params, opt_state, batch, progress) -> (params, opt_state, loss)`."""
  def train_step(params, opt_state, batch, progress):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, config)
    # Clip the global gradient norm at 1: keeps the early steps stable.
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / (norm + 1e-6)), grads)
    lr = learning_rate(progress, peak_lr)
    params, opt_state = adam_update(params, grads, opt_state, lr, weight_decay=0.01)
    return params, opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


def progress_line(progress: float, step: int, loss: float, elapsed: float, chars: int) -> str:
  """`[#####...............] 25% step 120 loss 1.853 | 2.10 steps/s 8.6k chars/s | eta 7m02s`."""
  width = 20
  filled = int(width * progress)
  rate = step / max(elapsed, 1e-9)
  eta = elapsed * (1 - progress) / max(progress, 1e-9)
  return (f"[{'#' * filled}{'.' * (width - filled)}] {progress:4.0%} step {step} "
          f"loss {loss:.3f} | "
          f"{rate:.2f} steps/s {chars / max(elapsed, 1e-9) / 1e3:.1f}k chars/s | "
          f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


def train(config: transformer.Config, data: np.ndarray, *, steps: int, batch_size: int,
          seq_len: int, lr: float, seed: int = 0, time_budget_s: float | None = None,
          log_every: int = 50, log: Callable[[str], None] = print):
  """Trains from scratch on `data` (int32 ids); returns (params, last logged loss).

  Stops early, keeping what it has, once `time_budget_s` has passed; the
  learning rate schedule follows whichever of steps and time runs out first.
  """
  params = transformer.init_params(jax.random.key(seed), config)
  opt_state = adam_init(params)
  train_step = make_train_step(config, lr)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  losses = []
  loss = float("nan")
  for i in range(1, steps + 1):
    batch = jnp.asarray(sample_batch(rng, data, batch_size, seq_len))
    progress = (i - 1) / steps
    if time_budget_s is not None and i > 1:  # Step 1 is mostly compile time.
      progress = max(progress, (time.perf_counter() - start) / time_budget_s)
    if progress >= 1.0:
      log(f"time budget of {time_budget_s:.0f}s reached after {i - 1} steps")
      break
    params, opt_state, step_loss = train_step(params, opt_state, batch, progress)
    # Wait for the step, so that the time-based progress is not run ahead by dispatch.
    losses.append(jax.block_until_ready(step_loss))
    if i % log_every == 0 or i == steps:
      loss = float(np.mean(jax.device_get(losses)))
      losses = []
      elapsed = time.perf_counter() - start
      done = i / steps if time_budget_s is None else max(i / steps, elapsed / time_budget_s)
      log(progress_line(min(done, 1.0), i, loss, elapsed, i * batch_size * seq_len))
  return params, loss
