r"""Benchmarks the serving engine (kvattn.serving) against static batching on one request stream.

The workload (`make_workload`, deterministic from --seed): --num_requests
requests, each with a prompt of log-uniform length in --prompt_len (8..256
tokens: many short prompts, a few long ones) and a max_tokens of
log-uniform length in --output_len (4..256: most outputs short, a long
tail, as in chat traffic; a static batch of 16 then nearly always holds a
long one and waits for it, the case where static batching loses). A
--shared_prefix_share of the requests begin with one of --num_prefixes
common prefixes of --shared_prefix_len tokens (a system prompt, a
few-shot template) before their own tokens. Token ids are random in
[1, V). Arrivals are Poisson at --rate requests per second, or
all at once with --rate=0 (pure throughput). Every request is greedy, and
no end-of-sequence stops it: each draws exactly its max_tokens. The
defaults (128 requests, 16 slots) keep the engine's slots mostly full
between the start and the drain at the end, as a server under steady load.

Every mode serves the SAME requests in one process, one after the other,
and every request's arrival is measured from the mode's own start:

  * "continuous": `kvattn.serving.Engine` in-process. A loop adds the
    requests that are due, then runs `engine.step()`; when the engine is
    idle it sleeps until the next arrival. Warmup (compilation) is done in
    the constructor, before the clock starts.
  * "continuous, no prefix cache": the same with prefix_caching=False; the
    "Prefix caching" table compares the shared-prefix requests' TTFT.
  * "static": batches of --max_seqs requests in arrival order, each started
    once its last request has arrived and the previous batch is done, and
    run by `kvattn.generate` (one prefill, then the compiled decode loop)
    to the batch's longest max_tokens: a batch waits for its slowest
    member, and the tokens drawn past a request's own max_tokens are
    wasted (not counted). The prompts are right-padded, and the loop's
    length rounded up, to a multiple of --static_bucket (16), so a few
    shapes compile (at most one per batch), each before the clock starts.
    Tokens are delivered when the batch returns: TTFT is the batch's end.
  * "static, streamed": the same batches through `kvattn.generate_stream`,
    token by token from Python, stopping at the batch's longest max_tokens
    exactly: true TTFT and inter-token latency for static batching.
  * "http" (--http): the stream over HTTP to `kvattn.serving.openai_api`
    started in-process on 127.0.0.1 (skipped when it or fastapi, uvicorn
    or openai cannot be imported).
  * "transformers" (--transformers, with --checkpoint): transformers'
    continuous-batching manager (the one behind `model.generate_batch`) on
    the same checkpoint, requests added at their arrival times with their
    own max_new_tokens (skipped when torch or transformers is missing).

Columns: TTFT, time from a request's arrival to its first token; TPOT, a
request's time per output token after the first (percentiles over the
requests); ITL, the gaps between a request's consecutive tokens as they
reach the caller (all requests pooled: tokens that arrive together, as
the engine's decode runs of several steps in one call deliver them, count
as gaps of 0 after the first); slot occupancy, the mean share of the rows
in use (engine: slots holding a sequence per step; static: rows still
drawing a counted token per decode step); page occupancy, the mean share
of the cache held (engine: pages held by a slot over the pool; static:
tokens in the dense caches over their capacity); prefix hit rate, prompt
tokens the prefix cache gave over all prompt tokens.

Usage:
  python examples/benchmark_serving.py                 # charlm, 128 requests, all at once
  python examples/benchmark_serving.py --rate=10       # Poisson arrivals, 10 requests/s
  python examples/benchmark_serving.py --checkpoint=DIR --transformers
  python examples/benchmark_serving.py --random_llama=/tmp/llama --transformers
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import re
import socket
import sys
import threading
import time
from typing import Callable, NamedTuple, Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, str(pathlib.Path(__file__).absolute().parents[1]))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kvattn
from kvattn import serving
from kvattn.models import transformer

logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
for _name in ("httpx", "httpx2"):  # The openai client's HTTP stack logs every request at INFO.
  logging.getLogger(_name).setLevel(logging.WARNING)

_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 128, "Requests in the stream.")
_RATE = flags.DEFINE_float("rate", 0.0, "Poisson arrivals per second; 0: all at once.")
_PROMPT_LEN = flags.DEFINE_list("prompt_len", ["8", "256"],
                                "Shortest and longest prompt (log-uniform), without a prefix.")
_OUTPUT_LEN = flags.DEFINE_list("output_len", ["4", "256"],
                                "Fewest and most tokens a request asks for (log-uniform).")
_SHARED_PREFIX_SHARE = flags.DEFINE_float("shared_prefix_share", 0.5,
                                          "Share of the requests that start with a shared prefix.")
_SHARED_PREFIX_LEN = flags.DEFINE_integer("shared_prefix_len", 128, "Tokens of a shared prefix.")
_NUM_PREFIXES = flags.DEFINE_integer("num_prefixes", 4, "Distinct shared prefixes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the workload.")
_MAX_SEQS = flags.DEFINE_integer("max_seqs", 16, "Engine slots; the static batch size.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 128, "Engine: most tokens per step.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Engine: tokens per page.")
_MAX_LEN = flags.DEFINE_integer("max_len", 640, "Engine: most tokens of a sequence.")
_STATIC_BUCKET = flags.DEFINE_integer(
    "static_bucket", 16, "Static: prompts and the decode loop are padded to multiples of this.")
_PREFIX_OFF = flags.DEFINE_bool("prefix_off", True, "Also run the engine with prefix caching off.")
_STATIC_STREAM = flags.DEFINE_bool("static_stream", True,
                                   "Also run static batching streamed (generate_stream).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Rounds of every mode, in turn; the median round by tokens/s is kept.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A Hugging Face checkpoint directory; None: the bundled charlm.")
_RANDOM_LLAMA = flags.DEFINE_string(
    "random_llama", None, "Write a small random Llama checkpoint here with transformers (if "
    "absent) and use it as --checkpoint.")
_HTTP = flags.DEFINE_bool("http", False, "Also serve the stream over HTTP (openai_api).")
_TRANSFORMERS = flags.DEFINE_bool(
    "transformers", False, "Also run transformers' continuous batching (needs --checkpoint).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The params' dtype.")

# A request's settings in every mode: greedy, and only max_tokens ends it.
_GREEDY = dict(temperature=0.0, ignore_eos=True)


class Request(NamedTuple):
  """One request of the stream."""

  prompt: tuple[int, ...]
  max_tokens: int
  arrival: float  # Seconds after the stream's start.
  prefix: int  # Which shared prefix it starts with; -1: none.


@dataclasses.dataclass
class Run:
  """What one mode did with the stream.

  tokens[i] are request i's tokens; ttft[i] its time to first token (s);
  tpot[i] its time per output token after the first (s; NaN for one
  token); itl every gap between consecutive tokens of one request (s),
  pooled; the occupancies and hit rate are None where a mode has none.
  """

  mode: str
  tokens: list[list[int]]
  ttft: np.ndarray
  tpot: np.ndarray
  itl: np.ndarray
  wall: float
  slot_occupancy: float | None = None
  page_occupancy: float | None = None
  prefix_hit_rate: float | None = None
  note: str = ""

  @property
  def generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_s(self) -> float:
    return self.generated / self.wall


def log_uniform(rng: np.random.Generator, low: int, high: int, size: int) -> np.ndarray:
  """Ints in [low, high], log-uniform: as many in 8..16 as in 128..256."""
  drawn = np.exp(rng.uniform(np.log(low), np.log(high + 1), size))
  return np.clip(np.floor(drawn).astype(np.int64), low, high)


def make_workload(num_requests: int, *, vocab_size: int, rate: float = 0.0,
                  prompt_len: tuple[int, int] = (8, 256), output_len: tuple[int, int] = (4, 256),
                  shared_prefix_share: float = 0.5, shared_prefix_len: int = 128,
                  num_prefixes: int = 4, seed: int = 0) -> list[Request]:
  """The request stream, in arrival order (see the module docstring); the first arrives at 0."""
  for name, (low, high) in (("prompt_len", prompt_len), ("output_len", output_len)):
    if not 1 <= low <= high:
      raise ValueError(f"{name} should be 1 <= low <= high: but got {(low, high)}")
  if not 0.0 <= shared_prefix_share <= 1.0:
    raise ValueError(f"shared_prefix_share should be in [0, 1]: but got {shared_prefix_share}")
  if rate < 0:
    raise ValueError(f"rate should be >= 0 (0: all at once): but got {rate}")
  rng = np.random.default_rng(seed)
  lengths = log_uniform(rng, *prompt_len, num_requests)
  outputs = log_uniform(rng, *output_len, num_requests)
  gaps = rng.exponential(1.0 / rate, num_requests) if rate else np.zeros(num_requests)
  arrivals = np.cumsum(gaps) - gaps[0]
  prefixes = rng.integers(1, vocab_size, (max(num_prefixes, 1), shared_prefix_len))
  shared = rng.random(num_requests) < (shared_prefix_share if num_prefixes else 0.0)
  which = rng.integers(0, max(num_prefixes, 1), num_requests)
  requests = []
  for i in range(num_requests):
    own = rng.integers(1, vocab_size, lengths[i])
    prompt = np.concatenate([prefixes[which[i]], own]) if shared[i] else own
    requests.append(
        Request(tuple(int(t) for t in prompt), int(outputs[i]), float(arrivals[i]),
                int(which[i]) if shared[i] else -1))
  return requests


def _percentiles(values: np.ndarray) -> tuple[float, ...]:
  values = np.asarray(values, np.float64)
  if not values.size:
    return (float("nan"),) * 3
  return tuple(float(np.percentile(values, q)) for q in (50, 90, 99))


class _Recorder:
  """Per-request tokens, first-token times and gaps, on the clock of one mode's start."""
  def __init__(self, requests: Sequence[Request]):
    self.requests = requests
    self.tokens = [[] for _ in requests]
    self.first = np.full((len(requests),), np.nan)
    self.last = np.zeros((len(requests),))
    self.gaps = []
    self.done = 0

  def add(self, i: int, tokens: Sequence[int], now: float, finished: bool = False) -> None:
    self.done += finished
    if not len(tokens):
      return
    if np.isnan(self.first[i]):
      self.first[i] = now
    else:
      self.gaps.append(now - self.last[i])
    self.gaps.extend([0.0] * (len(tokens) - 1))  # Tokens delivered together.
    self.last[i] = now
    self.tokens[i].extend(int(t) for t in tokens)

  def run(self, mode: str, wall: float, **kw) -> Run:
    arrivals = np.array([r.arrival for r in self.requests])
    counts = np.array([len(t) for t in self.tokens])
    with np.errstate(invalid="ignore", divide="ignore"):
      tpot = np.where(counts > 1, (self.last - self.first) / (counts - 1), np.nan)
    return Run(mode, self.tokens, self.first - arrivals, tpot, np.asarray(self.gaps), wall, **kw)


def _wait_until(clock: Callable[[], float], start: float, t: float) -> None:
  """Sleeps until `t` seconds after `start` (no busy loop)."""
  delay = t - (clock() - start)
  if delay > 0:
    time.sleep(delay)


# The engine. ---------------------------------------------------------------


def run_engine(params, config: transformer.Config, requests: Sequence[Request],
               engine_config: serving.EngineConfig, mode: str = "continuous",
               clock: Callable[[], float] = time.perf_counter) -> Run:
  """Serves the stream with a fresh `kvattn.serving.Engine` (warmed up before the clock)."""
  engine = serving.Engine(params, config, engine_config, clock=clock)
  settings = [serving.SamplingParams(max_tokens=r.max_tokens, **_GREEDY) for r in requests]
  for r, s in zip(requests, settings):
    engine.check_request(r.prompt, s)
  record = _Recorder(requests)
  n, added = len(requests), 0
  max_loops = 4 * sum(r.max_tokens + len(r.prompt) for r in requests) + 1000
  start = clock()
  for _ in range(max_loops):
    if record.done == n:
      break
    now = clock() - start
    while added < n and requests[added].arrival <= now:
      engine.add_request(requests[added].prompt, settings[added], request_id=str(added))
      added += 1
    if not engine.has_work():
      if added == n:
        raise RuntimeError(f"the engine is idle with {n - record.done} requests unfinished")
      _wait_until(clock, start, requests[added].arrival)
      continue
    outputs = engine.step()
    now = clock() - start
    for out in outputs:
      record.add(int(out.request_id), out.token_ids, now, out.finished)
  else:
    raise RuntimeError(f"the engine did not finish the stream in {max_loops} loops")
  m = engine.metrics()
  return record.run(mode, float(record.last.max()), slot_occupancy=m["slot_occupancy"],
                    page_occupancy=m["page_occupancy"], prefix_hit_rate=m["prefix_hit_rate"],
                    note=f"{m['steps']} steps, {m['preemptions']} preemptions")


# Static batching. -----------------------------------------------------------


def static_batches(requests: Sequence[Request], batch: int) -> list[list[int]]:
  """Request indices in batches of `batch`, in arrival order."""
  return [list(range(i, min(i + batch, len(requests)))) for i in range(0, len(requests), batch)]


def static_shape(requests: Sequence[Request], batch: Sequence[int], bucket: int) -> tuple[int, int]:
  """(P, M): the batch's longest prompt and max_tokens, each rounded up to a multiple of bucket."""
  p = max(len(requests[i].prompt) for i in batch)
  m = max(requests[i].max_tokens for i in batch)
  return -(-p // bucket) * bucket, -(-m // bucket) * bucket


def _static_inputs(requests, batch, rows: int, p: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompts int32 [B, P] and mask [B, P]; rows past the batch hold one token."""
  tokens = np.zeros((rows, p), np.int32)
  mask = np.zeros((rows, p), bool)
  mask[len(batch):, 0] = True
  tokens[len(batch):, 0] = 1
  for row, i in enumerate(batch):
    prompt = requests[i].prompt
    tokens[row, :len(prompt)] = prompt
    mask[row, :len(prompt)] = True
  return tokens, mask


def run_static(params, config: transformer.Config, requests: Sequence[Request], batch_size: int, *,
               bucket: int = 16, stream: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> Run:
  """Serves the stream in static batches (see the module docstring); compiles before the clock."""
  step_fn = transformer.step_fn(config)
  dtype = params["embed"].dtype
  batches = static_batches(requests, batch_size)

  def columns(batch, shape, steps):
    """Yields (j, tokens [B] of column j) for j < steps."""
    p, m = shape
    tokens, mask = _static_inputs(requests, batch, batch_size, p)
    caches = transformer.init_caches(config, batch_size, p + m, dtype)
    if not stream:  # The whole loop compiled: every column at the end.
      out = kvattn.generate(step_fn, params, caches, tokens, mask, max_new_tokens=m,
                            prompt_buckets=None, donate_caches=True)
      yield from enumerate(np.asarray(out.tokens).T[:steps])
      return
    drawn = kvattn.generate_stream(step_fn, params, caches, tokens, mask, max_new_tokens=m,
                                   prompt_buckets=None)
    for j, column in zip(range(steps), drawn):
      yield j, np.asarray(column)

  shapes = [static_shape(requests, b, bucket) for b in batches]
  for shape in sorted(set(shapes)):  # Warmup: every shape compiles (two steps) before the clock.
    for _ in columns([], shape, 2):
      pass
  record = _Recorder(requests)
  row_steps = used = held = capacity = 0
  start = clock()
  for batch, shape in zip(batches, shapes):
    _wait_until(clock, start, max(requests[i].arrival for i in batch))
    # Streamed, the batch stops at its longest request; compiled, it runs the padded loop.
    steps = max(requests[i].max_tokens for i in batch) if stream else shape[1]
    for j, column in columns(batch, shape, steps):
      now = clock() - start
      for row, i in enumerate(batch):
        if j < requests[i].max_tokens:
          record.add(i, [column[row]], now, j + 1 == requests[i].max_tokens)
    row_steps += steps * batch_size
    capacity += steps * batch_size * sum(shape)
    for i in batch:
      n, m = len(requests[i].prompt), requests[i].max_tokens
      used += m
      held += int(np.minimum(n + np.arange(steps), n + m).sum())  # Tokens in its cache row.
  mode = "static, streamed" if stream else "static"
  return record.run(mode, float(record.last.max()), slot_occupancy=used / row_steps,
                    page_occupancy=held / capacity,
                    note=f"{len(batches)} batches, {len(set(shapes))} shapes")


# HTTP (optional). -----------------------------------------------------------


class IdTokenizer:
  """Token ids as text, "<id>" each: a streamed completion's text gives back its exact ids."""
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens
    return [int(t) for t in re.findall(r"<(\d+)>", text)]

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(f"<{int(i)}>" for i in ids)


def run_http(params, config: transformer.Config, requests: Sequence[Request],
             engine_config: serving.EngineConfig,
             clock: Callable[[], float] = time.perf_counter) -> Run | str:
  """The stream over HTTP: `openai_api` in a uvicorn thread, the `openai` client streaming.

  Client, server and engine share this process (and its GIL). A str says
  why the mode was skipped.
  """
  try:
    import asyncio  # pylint: disable=g-import-not-at-top
    import openai  # pylint: disable=g-import-not-at-top
    import uvicorn  # pylint: disable=g-import-not-at-top
    from kvattn.serving import async_engine  # pylint: disable=g-import-not-at-top
    from kvattn.serving import openai_api  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"http skipped: {e}"
  engine = serving.Engine(params, config, engine_config, clock=clock)
  runner = async_engine.AsyncEngine(engine)
  app_ = openai_api.build_app(runner, IdTokenizer(), "bench")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning"))
  record = _Recorder(requests)
  ids = IdTokenizer()

  async def one(client, i, start):
    await asyncio.sleep(max(0.0, requests[i].arrival - (clock() - start)))
    chunks = await client.completions.create(model="bench", prompt=list(requests[i].prompt),
                                             max_tokens=requests[i].max_tokens, temperature=0.0,
                                             stream=True, extra_body=dict(ignore_eos=True))
    async for chunk in chunks:
      for choice in chunk.choices:
        finished = choice.finish_reason is not None
        record.add(i, ids.encode(choice.text), clock() - start, finished)

  async def stream():
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    async with client:
      start = clock()
      await asyncio.gather(*(one(client, i, start) for i in range(len(requests))))

  with runner:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
      while not server.started:
        if not thread.is_alive():
          return "http skipped: the server did not start"
        time.sleep(0.01)
      asyncio.run(stream())
    finally:
      server.should_exit = True
      thread.join(timeout=30)
  m = engine.metrics()
  return record.run("http", float(record.last.max()), slot_occupancy=m["slot_occupancy"],
                    page_occupancy=m["page_occupancy"], prefix_hit_rate=m["prefix_hit_rate"],
                    note=f"{m['steps']} steps")


# transformers (optional). ---------------------------------------------------


def write_random_llama(directory: str | pathlib.Path, seed: int = 0) -> None:
  """A small random Llama checkpoint (4 layers, width 256, vocab 1024) by transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  hf = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=2048, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(hf).save_pretrained(directory)


def run_transformers(directory, requests: Sequence[Request], engine_config: serving.EngineConfig,
                     dtype: str = "float32",
                     clock: Callable[[], float] = time.perf_counter) -> Run | str:
  """transformers' continuous batching on the stream; a str says why not.

  Its sizes are the engine's: as many requests per batch, tokens per batch,
  tokens per page and pages.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from transformers.generation import configuration_utils  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"transformers skipped: {e}"
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                            attn_implementation="sdpa").eval()
  generation_config = transformers.GenerationConfig(
      do_sample=False, eos_token_id=-1, max_new_tokens=max(r.max_tokens for r in requests))
  ec = engine_config
  cb = configuration_utils.ContinuousBatchingConfig(max_requests_per_batch=ec.max_seqs,
                                                    max_batch_tokens=ec.token_budget,
                                                    page_size=ec.page_size,
                                                    num_blocks=ec.pool_pages)
  record = _Recorder(requests)
  n, added = len(requests), 0
  with torch.inference_mode():
    manager = model.init_continuous_batching(generation_config=generation_config,
                                             continuous_batching_config=cb)
    manager.start()
    try:
      for k in range(2):  # Warmup: one short request, then one long one (not in the stream).
        manager.add_request([1] * (16 + 100 * k), f"warmup-{k}", max_new_tokens=8 + 64 * k)
        while (result := manager.get_result(timeout=60)) is not None:
          if result.is_finished():
            break
      start = last = clock()
      while record.done < n:
        if clock() - last > 120:
          raise RuntimeError("transformers gave no token for 120 s")
        now = clock() - start
        while added < n and requests[added].arrival <= now:
          manager.add_request(list(requests[added].prompt), str(added),
                              max_new_tokens=requests[added].max_tokens, streaming=True)
          added += 1
        wait = requests[added].arrival - (clock() - start) if added < n else 60.0
        result = manager.get_result(timeout=max(wait, 1e-3))
        if result is None:
          if added == n and not manager.is_running():
            raise RuntimeError("transformers' generation thread stopped")
          continue
        i, last = int(result.request_id), clock()
        fresh = result.generated_tokens[len(record.tokens[i]):]
        record.add(i, fresh, last - start, result.is_finished())
    finally:
      manager.stop(block=True, timeout=30)
  return record.run("transformers", float(record.last.max()))


# Tables. ---------------------------------------------------------------------


def _ms(x: float) -> str:
  return "—" if np.isnan(x) else f"{1e3 * x:.1f}"


def _share(x: float | None) -> str:
  return "—" if x is None else f"{x:.2f}"


def results_table(runs: Sequence[Run]) -> str:
  """The markdown table of every mode: throughput, latency percentiles, occupancy, hit rate."""
  lines = [
      "| mode | requests | generated tokens | wall s | tokens/s | TTFT p50 ms | p90 | p99 | "
      "TPOT p50 ms | p90 | ITL p50 ms | p90 | p99 | slot occ. | page occ. | prefix hit rate |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: | ---: | ---: |"
  ]
  for r in runs:
    ttft, itl = _percentiles(r.ttft), _percentiles(r.itl)
    tpot = _percentiles(r.tpot[~np.isnan(r.tpot)])
    # Static batching delivers a batch's tokens together: no gaps to speak of.
    gaps = ["—"] * 5 if r.mode == "static" else [_ms(x) for x in tpot[:2] + itl]
    cells = [
        r.mode,
        str(len(r.tokens)),
        str(r.generated), f"{r.wall:.2f}", f"{r.tokens_per_s:.0f}", *[_ms(x) for x in ttft], *gaps,
        _share(r.slot_occupancy),
        _share(r.page_occupancy),
        _share(r.prefix_hit_rate)
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ratio_table(runs: Sequence[Run]) -> str:
  """Continuous against each other mode: tokens/s, TTFT p50 and p90, requests with equal tokens."""
  by_mode = {r.mode: r for r in runs}
  ours = by_mode["continuous"]
  lines = [
      "| continuous against | tokens/s: continuous / other | TTFT p50: other / continuous | "
      "TTFT p90: other / continuous | same tokens as continuous |",
      "| --- | ---: | ---: | ---: | ---: |"
  ]
  for r in runs:
    if r.mode == "continuous" or r.mode.startswith("continuous,"):
      continue
    a, b = _percentiles(ours.ttft), _percentiles(r.ttft)
    same = sum(x == y for x, y in zip(ours.tokens, r.tokens))
    lines.append(f"| {r.mode} | {ours.tokens_per_s / r.tokens_per_s:.2f}x | "
                 f"{b[0] / a[0]:.2f}x | {b[1] / a[1]:.2f}x | {same} of {len(r.tokens)} |")
  return "\n".join(lines)


def prefix_table(runs: Sequence[Run], requests: Sequence[Request]) -> str:
  """TTFT of the shared-prefix requests and of the others, per engine mode."""
  shared = np.array([r.prefix >= 0 for r in requests])
  lines = [
      "| mode | shared-prefix requests | TTFT p50 ms | p90 | other requests | TTFT p50 ms | p90 | "
      "prefix hit rate |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  ]
  for r in runs:
    if r.prefix_hit_rate is None:
      continue
    s, o = _percentiles(r.ttft[shared]), _percentiles(r.ttft[~shared])
    lines.append(f"| {r.mode} | {int(shared.sum())} | {_ms(s[0])} | {_ms(s[1])} | "
                 f"{int((~shared).sum())} | {_ms(o[0])} | {_ms(o[1])} | "
                 f"{_share(r.prefix_hit_rate)} |")
  return "\n".join(lines)


def check_runs(runs: Sequence[Run], requests: Sequence[Request]) -> None:
  """Raises RuntimeError unless every request of every mode got exactly its max_tokens."""
  for r in runs:
    short = [i for i, (t, q) in enumerate(zip(r.tokens, requests)) if len(t) != q.max_tokens]
    if short:
      raise RuntimeError(f"{r.mode}: requests {short[:10]} did not get their max_tokens")


def median_round(rounds: Sequence[Run]) -> Run:
  """The round with the median tokens/s (the lower middle one for an even count)."""
  ordered = sorted(rounds, key=lambda r: r.tokens_per_s)
  return ordered[(len(ordered) - 1) // 2]


def serve_modes(modes: dict[str, Callable[[], Run | str]], rounds: int = 1) -> list[Run]:
  """Runs every mode once per round, in turn; keeps each mode's median round.

  A mode that returns a str is skipped from then on (the str is printed).
  """
  results = {mode: [] for mode in modes}
  for _ in range(rounds):
    for mode, run in modes.items():
      if results[mode] is None:
        continue
      result = run()
      if isinstance(result, str):
        print(f"\n{result}")
        results[mode] = None
      else:
        results[mode].append(result)
  return [median_round(r) for r in results.values() if r]


def report(runs: Sequence[Run], requests: Sequence[Request], rate: float = 0.0) -> None:
  """Prints the tables and the goals (the throughput goal only for arrivals all at once)."""
  check_runs(runs, requests)
  print("\n## Serving the stream\n")
  print(results_table(runs))
  print("\n" + "\n".join(f"- {r.mode}: {r.note}" for r in runs if r.note))
  by_mode = {r.mode: r for r in runs}
  if "continuous" not in by_mode:
    return
  print("\n## Continuous batching against the others\n")
  print(ratio_table(runs))
  shared = np.array([r.prefix >= 0 for r in requests])
  if shared.any():
    print("\n## Prefix caching\n")
    print(prefix_table(runs, requests))
  print()
  if "static" in by_mode and not rate:
    ratio = by_mode["continuous"].tokens_per_s / by_mode["static"].tokens_per_s
    print(f"Goal: continuous batching >= 2x static batching's tokens/s: "
          f"{'met' if ratio >= 2 else 'not met'} ({ratio:.2f}x).")
  elif rate:
    offered = rate * np.mean([r.max_tokens for r in requests])
    print(f"Throughput: bounded by the arrivals here (about {offered:.0f} tokens/s asked for); "
          f"compare it with --rate=0.")
  off = by_mode.get("continuous, no prefix cache")
  if shared.any() and off is not None:
    on_p50 = _percentiles(by_mode["continuous"].ttft[shared])[0]
    off_p50 = _percentiles(off.ttft[shared])[0]
    print(f"Goal: prefix caching cuts the shared-prefix requests' TTFT p50: "
          f"{'met' if on_p50 < off_p50 else 'not met'} ({_ms(off_p50)} ms -> {_ms(on_p50)} ms).")


def load_model(checkpoint: str | None, dtype: str):
  """(params, config, name): the bundled charlm, or a Hugging Face checkpoint."""
  if checkpoint is None:
    from kvattn.models import charlm  # pylint: disable=g-import-not-at-top
    params, config, _ = charlm.load()
    name = "charlm"
  else:
    from kvattn.models import loaders  # pylint: disable=g-import-not-at-top
    params, config, _ = loaders.load(checkpoint)
    name = checkpoint
  params = jax.tree.map(lambda a: jnp.asarray(a, getattr(jnp, dtype)), params)
  return params, config, name


def describe(requests: Sequence[Request], rate: float, seed: int, prefix_len: int,
             ec: serving.EngineConfig) -> str:
  """The workload's heading and summary (markdown)."""
  prompts = np.array([len(r.prompt) for r in requests])
  outputs = np.array([r.max_tokens for r in requests])
  prefixes = {r.prefix for r in requests if r.prefix >= 0}
  shared = [r for r in requests if r.prefix >= 0]
  arrival = "all at once" if not rate else f"Poisson at {rate:g}/s"
  return (f"## Workload: {len(requests)} requests, {arrival}, seed {seed}\n\n"
          f"Prompts {prompts.min()}..{prompts.max()} tokens (mean {prompts.mean():.0f}), outputs "
          f"{outputs.min()}..{outputs.max()} (mean {outputs.mean():.0f}, {outputs.sum()} in "
          f"all); {len(shared)} requests start with one of {len(prefixes)} shared prefixes of "
          f"{prefix_len} tokens. "
          f"Engine: max_seqs {ec.max_seqs}, token_budget {ec.token_budget}, pages of "
          f"{ec.page_size}, max_len {ec.max_len}; static: batches of {ec.max_seqs}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint = _RANDOM_LLAMA.value or _CHECKPOINT.value
  if _RANDOM_LLAMA.value and not (pathlib.Path(checkpoint) / "config.json").exists():
    try:
      write_random_llama(checkpoint, _SEED.value)
    except ImportError as e:
      raise app.UsageError(f"--random_llama needs torch and transformers: {e}") from None
  if _TRANSFORMERS.value and checkpoint is None:
    raise app.UsageError("--transformers needs --checkpoint or --random_llama")
  params, config, name = load_model(checkpoint, _DTYPE.value)
  prompt_len = tuple(int(x) for x in _PROMPT_LEN.value)
  output_len = tuple(int(x) for x in _OUTPUT_LEN.value)
  longest = prompt_len[1] + output_len[1] + _SHARED_PREFIX_LEN.value * (_SHARED_PREFIX_SHARE.value
                                                                        > 0)
  if longest > _MAX_LEN.value:
    raise app.UsageError(f"--max_len={_MAX_LEN.value} should hold the longest request, "
                         f"{longest} tokens")
  requests = make_workload(_NUM_REQUESTS.value, vocab_size=config.vocab_size, rate=_RATE.value,
                           prompt_len=prompt_len, output_len=output_len,
                           shared_prefix_share=_SHARED_PREFIX_SHARE.value,
                           shared_prefix_len=_SHARED_PREFIX_LEN.value,
                           num_prefixes=_NUM_PREFIXES.value, seed=_SEED.value)
  ec = serving.EngineConfig(max_seqs=_MAX_SEQS.value, max_len=_MAX_LEN.value,
                            page_size=_PAGE_SIZE.value, token_budget=_TOKEN_BUDGET.value)
  engine = functools.partial(run_engine, params, config, requests)
  static = functools.partial(run_static, params, config, requests, ec.max_seqs,
                             bucket=_STATIC_BUCKET.value)
  modes = {"continuous": functools.partial(engine, ec)}
  if _PREFIX_OFF.value:
    modes["continuous, no prefix cache"] = functools.partial(engine,
                                                             ec._replace(prefix_caching=False),
                                                             "continuous, no prefix cache")
  modes["static"] = static
  if _STATIC_STREAM.value:
    modes["static, streamed"] = functools.partial(static, stream=True)
  if _HTTP.value:
    modes["http"] = functools.partial(run_http, params, config, requests, ec)
  if _TRANSFORMERS.value:
    modes["transformers"] = functools.partial(run_transformers, checkpoint, requests, ec,
                                              _DTYPE.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; model {name} (V="
        f"{config.vocab_size}, {config.num_layers} layers, width {config.d_model}), "
        f"{_DTYPE.value}; {_ROUNDS.value} round(s), the median round of each mode kept\n")
  print(describe(requests, _RATE.value, _SEED.value, _SHARED_PREFIX_LEN.value, ec))
  report(serve_modes(modes, _ROUNDS.value), requests, _RATE.value)


if __name__ == "__main__":
  app.run(main)
