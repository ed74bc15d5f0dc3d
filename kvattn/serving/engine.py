"""The continuous-batching engine: requests in, tokens out, one compiled step per token bucket.

`Engine` keeps a model's paged cache on the device and everything else on
the host: the waiting and running sequences and their pages
(`kvattn.serving.scheduler`), the prefix cache (`kvattn.serving.pool`). Each
`step()` runs one ragged batch (the decodes, then prefill chunks of the
prompts, up to the token budget) through one compiled function
(`kvattn.serving.step`), draws a token for every sequence whose prompt is
done, and returns what each request got. Requests join and leave between
steps: a finished or cancelled request frees its slot and pages at once.

All shapes are fixed at start-up: the token count of a step is padded to
one of a few buckets, every other array has the slots' size, and every
bucket compiles in the constructor (warmup), so serving never compiles.

`add_request` and `abort` may be called from any thread; `step` from one
thread at a time (`kvattn.serving.AsyncEngine` runs it in its own).

Shape legend:
  TT: tokens of one step (a bucket)
  SQ: sequence slots (max_seqs)
  PPS: pages per slot
  NP: pages in the pool
  PS: tokens per page
  V: vocabulary size
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from kvattn import paged
from kvattn import sharding
from kvattn._checks import is_int
from kvattn.models import transformer
from kvattn.serving import hosts
from kvattn.serving import pool as pool_lib
from kvattn.serving import scheduler as scheduler_lib
from kvattn.serving import step as step_lib
from kvattn.serving.settings import MAX_SEED, SamplingParams

# Latency samples kept for the metrics' percentiles (the most recent ones).
_SAMPLES = 20_000


class EngineConfig(NamedTuple):
  """The engine's static sizes.

  Attributes:
    max_seqs: SQ, sequences that run at once (an n > 1 request holds n).
    max_len: the most tokens of one sequence, prompt and output together.
    page_size: PS, tokens per page.
    num_pages: NP, pages in the pool; None: enough for every slot at
      max_len. At least one sequence's pages (ceil(max_len / PS)).
    token_budget: the most tokens one step runs (decodes and prefill
      chunks); at least max_seqs, so that every decode fits.
    token_buckets: the step sizes compiled, ascending, the last equal to
      token_budget; None: powers of two from the one >= max_seqs (at least
      8) up to the budget. A step runs at the smallest bucket that holds it.
    max_logprobs: the most alternatives a request may ask for per token.
    decode_steps: when a step would only decode (no prompt to prefill, no
      waiting request that could start), run up to this many decode steps
      in one compiled call, each feeding its draws to the next: the host's
      work and the device round trip are paid once per call. The tokens of
      a call arrive together. 1: one step per call.
    prefix_caching: share the pages of common prompt prefixes.
    cache_dtype: the pages' dtype; None: the embedding's dtype.
    quantized: int8 pages with per-token scales.
    seed: draws the seeds of requests that give none.
  """

  max_seqs: int = 8
  max_len: int = 512
  page_size: int = 16
  num_pages: int | None = None
  token_budget: int = 128
  token_buckets: tuple[int, ...] | None = None
  max_logprobs: int = 5
  decode_steps: int = 4
  prefix_caching: bool = True
  cache_dtype: Any = None
  quantized: bool = False
  seed: int = 0

  @property
  def pages_per_seq(self) -> int:
    return -(-self.max_len // self.page_size)

  @property
  def buckets(self) -> tuple[int, ...]:
    if self.token_buckets is not None:
      return tuple(self.token_buckets)
    size = max(8, 1 << (self.max_seqs - 1).bit_length())
    out = []
    while size < self.token_budget:
      out.append(size)
      size *= 2
    return tuple(out) + (self.token_budget,)

  @property
  def pool_pages(self) -> int:
    return self.max_seqs * self.pages_per_seq if self.num_pages is None else self.num_pages


def check_engine_config(ec: EngineConfig, config: transformer.Config) -> None:
  """Raises ValueError naming the first size out of range."""
  if not isinstance(ec, EngineConfig):
    raise TypeError(f"engine_config should be an EngineConfig: but got {type(ec).__name__}")
  for name in ("max_seqs", "max_len", "page_size", "token_budget", "decode_steps"):
    value = getattr(ec, name)
    if not is_int(value) or value < 1:
      raise ValueError(f"engine_config.{name} should be a positive int: but got {value!r}")
  if not is_int(ec.max_logprobs) or not 0 <= ec.max_logprobs <= config.vocab_size:
    raise ValueError(f"engine_config.max_logprobs should be an int in [0, V={config.vocab_size}]: "
                     f"but got {ec.max_logprobs!r}")
  if ec.token_budget < ec.max_seqs:
    raise ValueError(f"engine_config.token_budget should be >= max_seqs={ec.max_seqs} (every "
                     f"decode must fit in a step): but got {ec.token_budget}")
  if not is_int(ec.pool_pages) or ec.pool_pages < ec.pages_per_seq:
    raise ValueError(f"engine_config.num_pages should be an int >= ceil(max_len / page_size)="
                     f"{ec.pages_per_seq} (one sequence must always fit): but got {ec.num_pages!r}")
  buckets = ec.buckets
  if (not buckets or any(not is_int(b) or b < 1 for b in buckets)
      or list(buckets) != sorted(set(buckets)) or buckets[-1] != ec.token_budget):
    raise ValueError(f"engine_config.token_buckets should be ascending positive ints ending at "
                     f"token_budget={ec.token_budget}: but got {ec.token_buckets!r}")
  if config.max_positions and ec.max_len > config.max_positions:
    raise ValueError(f"engine_config.max_len should be at most the model's learned positions, "
                     f"{config.max_positions}: but got {ec.max_len}")
  if not is_int(ec.seed) or not 0 <= ec.seed <= MAX_SEED:
    raise ValueError(f"engine_config.seed should be an int in [0, {MAX_SEED}]: but got "
                     f"{ec.seed!r}")


class Logprob(NamedTuple):
  """A drawn token's log-probability and the most likely alternatives, most likely first."""

  token: int
  logprob: float
  top: tuple[tuple[int, float], ...]


class RequestOutput(NamedTuple):
  """What one output of a request got in one step.

  Attributes:
    request_id: the request's id.
    index: which of its n outputs.
    token_ids: the tokens drawn this step (one, or none when it ends
      without one: cancelled).
    logprobs: one `Logprob` per token when the request asked for logprobs,
      else None.
    finished: True on the output's last step.
    finish_reason: None, "stop" (a stop token was drawn; it is the last
      token), "length" (max_tokens drawn) or "abort" (cancelled).
  """

  request_id: str
  index: int
  token_ids: tuple[int, ...]
  logprobs: tuple[Logprob, ...] | None
  finished: bool
  finish_reason: str | None


@dataclasses.dataclass
class Completion:
  """A whole request's result (`Engine.generate`): per output, its tokens and logprobs."""

  request_id: str
  prompt_len: int
  token_ids: list[list[int]]
  logprobs: list[list[Logprob] | None]
  finish_reasons: list[str | None]


@dataclasses.dataclass(eq=False)
class _Request:
  request_id: str
  params: SamplingParams
  prompt_len: int
  arrival: float
  seqs: dict[int, scheduler_lib.Sequence]
  unfinished: set[int]
  cancelled: set[int] = dataclasses.field(default_factory=set)  # Before the fork.


class Engine:
  """Continuous batching over a `kvattn.models.transformer` model's paged step.

  Args:
    params: the model's params (`transformer.init_params`, or a loader's).
    config: its static `transformer.Config` (no windows, no LongRoPE: see
      `transformer.check_paged_config`).
    engine_config: the sizes (`EngineConfig`).
    eos_token_ids: ids that end a request unless it sets ignore_eos.
    mesh: None, or a `jax.sharding.Mesh`: the params and pages are placed
      with `rules` (kv heads and the MLP over "model"; the page table and
      everything else replicated).
    rules: the logical-axis rules for the mesh (`transformer.RULES`).
    warmup: compile every bucket now (default); False defers each to its
      first use (tests of the compile count need True).
    clock: seconds, for the metrics.
  """
  def __init__(self, params, config: transformer.Config,
               engine_config: EngineConfig = EngineConfig(), *, eos_token_ids: Sequence[int] = (),
               mesh=None, rules: sharding.Rules = transformer.RULES, warmup: bool = True,
               clock: Callable[[], float] = time.perf_counter):
    if not isinstance(config, transformer.Config):
      raise TypeError(f"config should be a transformer.Config: but got {type(config).__name__}")
    transformer.check_paged_config(config)
    check_engine_config(engine_config, config)
    self.config = config
    self.engine_config = ec = engine_config
    eos_token_ids = tuple(eos_token_ids)
    if not all(is_int(t) and 0 <= t < config.vocab_size for t in eos_token_ids):
      raise ValueError(f"eos_token_ids should be ids in [0, V={config.vocab_size}): but got "
                       f"{list(eos_token_ids)}")
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.clock = clock
    dtype = ec.cache_dtype or params["embed"].dtype
    caches = transformer.init_paged_caches(config, ec.pool_pages, ec.page_size, ec.max_seqs,
                                           ec.pages_per_seq, dtype, quantized=ec.quantized)
    cache_shardings = None
    # A mesh over several processes: process 0 takes the requests (`follow`).
    self._many_hosts = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
    self._closed = False
    if mesh is not None:
      shapes = jax.eval_shape(lambda: params)
      specs = sharding.tree_specs(shapes, transformer.params_logical_axes(shapes), mesh, rules,
                                  name="params")
      params = sharding.put(params, sharding.named(specs, mesh))
      cache_shardings = paged.paged_cache_shardings(caches, mesh, rules)
      caches = sharding.put(caches, cache_shardings)
    self.params = params
    self.caches = caches
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    self._step = step_lib.jitted(config, ec.max_logprobs, cache_shardings, replicated)
    self._decode_steps = step_lib.jitted_decode_steps(config, ec.max_logprobs, ec.decode_steps,
                                                      cache_shardings, replicated)
    self.pool = pool_lib.PagePool(ec.pool_pages, ec.page_size, ec.prefix_caching)
    self.scheduler = scheduler_lib.Scheduler(ec.max_seqs, ec.pages_per_seq, ec.token_budget,
                                             self.pool)
    self._lock = threading.Lock()
    self._inbox: list[tuple[str, Any]] = []
    self._requests: dict[str, _Request] = {}
    self._ids = itertools.count()
    self._seeds = np.random.default_rng(ec.seed)
    self._stats = collections.Counter()
    self._ttft = collections.deque(maxlen=_SAMPLES)
    self._itl = collections.deque(maxlen=_SAMPLES)
    if warmup:
      self.warmup()

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_len(self) -> int:
    return self.engine_config.max_len

  # Requests. ---------------------------------------------------------------

  def check_request(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    """Raises ValueError (or TypeError) for a request the engine cannot serve as asked."""
    if not isinstance(params, SamplingParams):
      raise TypeError(f"params should be SamplingParams: but got {type(params).__name__}")
    params.check(self.vocab_size, self.engine_config.max_logprobs)
    try:
      ids = np.asarray(prompt)
    except (TypeError, ValueError) as e:
      raise ValueError(f"prompt should be a sequence of token ids: {e}") from None
    if ids.size == 0:
      raise ValueError("prompt should be a non-empty list of token ids: but got an empty one")
    if ids.ndim != 1 or not (ids.dtype.kind in "iu"
                             or ids.dtype == object and all(is_int(t) for t in ids)):
      raise ValueError(f"prompt should be a non-empty list of token ids: but got shape "
                       f"{ids.shape} {ids.dtype}")
    ids = ids.astype(np.int64)
    if (ids < 0).any() or (ids >= self.vocab_size).any():
      raise ValueError(f"prompt ids should be in [0, V={self.vocab_size}): but got "
                       f"{int(ids.min())} .. {int(ids.max())}")
    if len(ids) + params.max_tokens > self.max_len:
      raise ValueError(f"prompt length + max_tokens should be at most max_len={self.max_len}: "
                       f"but got {len(ids)} + {params.max_tokens}")
    ec = self.engine_config
    if params.n > ec.max_seqs:
      raise ValueError(f"n should be at most max_seqs={ec.max_seqs}: but got {params.n}")
    if -(-len(ids) // ec.page_size) + params.n - 1 > ec.pool_pages:
      raise ValueError(f"the prompt and its {params.n} outputs need more pages than the pool's "
                       f"{ec.pool_pages}")
    return ids.tolist()

  def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                  request_id: str | None = None) -> str:
    """Queues a request (thread-safe); returns its id. Raises ValueError for a bad request."""
    params = SamplingParams() if params is None else params
    prompt = self.check_request(prompt, params)
    with self._lock:
      if request_id is None:
        request_id = f"req-{next(self._ids)}"
      elif not isinstance(request_id, str):
        raise TypeError(f"request_id should be a str: but got {type(request_id).__name__}")
      if request_id in self._requests or any(
          kind == "add" and item["request_id"] == request_id for kind, item in self._inbox):
        raise ValueError(f"request_id should be new: but {request_id!r} is running")
      if params.seed is None:
        params = dataclasses.replace(params,
                                     seed=int(self._seeds.integers(0, MAX_SEED - params.n + 2)))
      self._inbox.append(("add",
                          dict(request_id=request_id, prompt=prompt,
                               params=dataclasses.asdict(params), arrival=self.clock())))
    return request_id

  def abort(self, request_id: str, index: int | None = None) -> None:
    """Cancels a request (thread-safe): its slots and pages are freed at the next step.

    index: None cancels every output of the request; an int only that one
    (e.g. an output of n that met a stop string). Ids that finished already
    are ignored.
    """
    if index is not None and not is_int(index):
      raise ValueError(f"index should be an int or None: but got {index!r}")
    with self._lock:
      self._inbox.append(("abort", [request_id, index]))

  def has_work(self) -> bool:
    with self._lock:
      return bool(self._inbox) or self.scheduler.has_work()

  # Many hosts. -------------------------------------------------------------

  def follow(self, max_steps: int | None = None) -> None:
    """On a process other than 0 of a mesh over many hosts: steps as process 0 does.

    Process 0 takes the requests; every step it sends the others what
    arrived (`hosts.broadcast`), and each process runs the same schedule
    (it depends on nothing else) and the same compiled step over its devices
    of the mesh. Returns when process 0 calls `close()`; max_steps bounds
    the loop (RuntimeError past it).
    """
    if not self._many_hosts or jax.process_index() == 0:
      raise ValueError("follow() is for processes other than 0 of a mesh over many hosts")
    for _ in itertools.count() if max_steps is None else range(max_steps):
      self.step()
      if self._closed:
        return
    raise RuntimeError(f"follow() did not see close() in {max_steps} steps")

  def close(self) -> None:
    """On process 0 of a mesh over many hosts: ends the other processes' `follow()`."""
    if self._many_hosts and jax.process_index() == 0:
      with self._lock:
        self._inbox.append(("close", None))
      self.step()

  # The loop. ---------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """Runs one step; returns each output's new tokens, and the requests that ended."""
    outputs = self._take_inbox()
    plan = self.scheduler.schedule()
    self._stats["preemptions"] += len(plan.preempted)
    if not plan.chunks:
      return outputs
    start = self.clock()
    steps = self._decode_run(plan)
    if steps > 1:
      inputs, rows = self._inputs(plan, self.engine_config.max_seqs)
      draws, exhausted, self.caches = self._decode_steps(self.params, self.caches, inputs,
                                                         np.int32(steps))
    else:
      inputs, rows = self._inputs(plan)
      draws, exhausted, self.caches = self._step(self.params, self.caches, inputs)
    draws, exhausted = jax.device_get((draws, exhausted))
    if steps == 1:
      draws = jax.tree.map(lambda x: x[None], draws)  # On the host: nothing compiles.
    if exhausted.any():
      raise RuntimeError(f"the step found no page for slots {np.flatnonzero(exhausted).tolist()}: "
                         f"the engine reserved too few")
    now = self.clock()
    ec = self.engine_config
    self._stats["step_tokens"] += sum(c.count for c in plan.chunks) * steps
    pairs = list(zip(plan.chunks, rows))
    for j in range(steps):
      draw = jax.tree.map(lambda x, j=j: x[j], draws)
      # The tokens of a call arrive together; each is timed at its share of the call.
      outputs += self._update(plan._replace(chunks=[c for c, _ in pairs]), [r for _, r in pairs],
                              draw, start + (now - start) * (j + 1) / steps)
      pairs = [(c, r) for c, r in pairs if c.seq.finish_reason is None]
    self._stats["steps"] += steps
    self._stats["calls"] += 1
    self._stats["busy_s"] += now - start
    self._stats["slot_steps"] += (ec.max_seqs - len(self.scheduler.free_slots)) * steps
    self._stats["page_steps"] += self.pool.in_use * steps
    return outputs

  def _decode_run(self, plan: scheduler_lib.Plan) -> int:
    """How many decode steps the plan's call runs: 1, or up to decode_steps for a plain decode.

    More than one only when every chunk is one sequence's decode token,
    nothing waits that could start now, and every sequence has room (pages
    and max_tokens) for them all.
    """
    ec, scheduler = self.engine_config, self.scheduler
    if ec.decode_steps == 1 or plan.copies or any(
        c.count != 1 or c.draws != 1 or c.seq.drawn == 0 for c in plan.chunks):
      return 1
    if scheduler.waiting and len(scheduler.free_slots) >= scheduler.waiting[0].forks:
      return 1
    steps = min([ec.decode_steps] + [c.seq.params.max_tokens - c.seq.drawn for c in plan.chunks])
    if steps <= 1:
      return 1
    need = sum(scheduler.pages_for(c.seq, c.seq.computed + steps) for c in plan.chunks)
    if need > self.pool.available:
      return 1
    for c in plan.chunks:
      scheduler.grow(c.seq, c.seq.computed + steps)
    return steps

  def _take_inbox(self) -> list[RequestOutput]:
    with self._lock:
      inbox, self._inbox = self._inbox, []
    if self._many_hosts:
      inbox = hosts.broadcast(inbox)
    outputs = []
    for kind, item in inbox:
      if kind == "add":
        request = self._new_request(**item)
        self._requests[request.request_id] = request
        self.scheduler.add(request.seqs[0])
        self._stats["requests"] += 1
      elif kind == "close":
        self._closed = True
      else:
        outputs += self._abort(*item)
    return outputs

  def _abort(self, request_id: str, index: int | None) -> list[RequestOutput]:
    request = self._requests.get(request_id)
    if request is None:
      return []
    outputs = []
    for i in sorted(request.unfinished if index is None else request.unfinished & {index}):
      request.unfinished.discard(i)
      outputs.append(RequestOutput(request_id, i, (), None, True, "abort"))
      seq = request.seqs.get(i)
      if seq is not None and seq.forks == 1:
        self.scheduler.finish(seq, "abort")
      else:  # Not forked yet: dropped when the prompt is done.
        request.cancelled.add(i)
    if not request.unfinished:
      for seq in request.seqs.values():
        if seq.finish_reason is None:
          self.scheduler.finish(seq, "abort")
      self._stats["aborted"] += 1
      del self._requests[request_id]
    return outputs

  def _new_request(self, request_id, prompt, params, arrival) -> _Request:
    params = SamplingParams(**params)
    stop = frozenset(params.stop_token_ids)
    if not params.ignore_eos:
      stop |= frozenset(self.eos_token_ids)
    seq = scheduler_lib.Sequence(request_id, 0, list(prompt), len(prompt), params, params.seed,
                                 stop, arrival, forks=params.n)
    return _Request(request_id, params, len(prompt), arrival, {0: seq}, set(range(params.n)))

  def _inputs(self, plan: scheduler_lib.Plan, tt: int | None = None):
    ec = self.engine_config
    sq, pps, num_pages = ec.max_seqs, ec.pages_per_seq, ec.pool_pages
    total = sum(c.count for c in plan.chunks)
    tt = next(b for b in ec.buckets if b >= total) if tt is None else tt
    tokens = np.zeros((tt,), np.int32)
    seq_slots = np.zeros((sq,), np.int32)
    cu = np.zeros((sq + 1,), np.int32)
    page_table = np.full((sq, pps), paged.NO_PAGE, np.int32)
    lengths = np.zeros((sq,), np.int32)
    for seq in self.scheduler.running:
      page_table[seq.slot, :len(seq.pages)] = seq.pages
      lengths[seq.slot] = seq.computed
    copy_src = np.zeros((sq,), np.int32)
    copy_dst = np.full((sq,), num_pages, np.int32)
    for i, (src, dst) in enumerate(plan.copies):
      copy_src[i], copy_dst[i] = src, dst
    sample_at = np.zeros((sq,), np.int32)
    seeds = np.zeros((sq,), np.uint32)
    counts = np.zeros((sq,), np.int32)
    temperature = np.zeros((sq,), np.float32)
    top_k = np.zeros((sq,), np.int32)
    top_p = np.ones((sq,), np.float32)
    min_p = np.zeros((sq,), np.float32)
    rows = []  # (chunk index, first drawn row)
    r = 0
    for i, c in enumerate(plan.chunks):
      tokens[cu[i]:cu[i] + c.count] = c.seq.tokens[c.start:c.start + c.count]
      seq_slots[i] = c.seq.slot
      cu[i + 1] = cu[i] + c.count
      rows.append(r)
      p = c.seq.params
      for k in range(c.draws):
        sample_at[r] = cu[i + 1] - 1
        seeds[r] = c.seq.seed + k
        counts[r] = c.seq.drawn
        temperature[r] = p.temperature
        top_k[r] = p.top_k or 0
        top_p[r] = p.top_p
        min_p[r] = p.min_p
        r += 1
    cu[len(plan.chunks) + 1:] = cu[len(plan.chunks)]
    inputs = step_lib.StepInputs(tokens, seq_slots, cu,
                                 np.int32(len(plan.chunks)), page_table, lengths,
                                 self.pool.refs.copy(), copy_src, copy_dst, sample_at, seeds,
                                 counts, temperature, top_k, top_p, min_p)
    return inputs, rows

  def _update(self, plan, rows, draw, now) -> list[RequestOutput]:
    outputs = []
    for chunk, r in zip(plan.chunks, rows):
      seq = chunk.seq
      seq.computed += chunk.count
      self.scheduler.remember_pages(seq)
      if not chunk.draws:
        continue
      request = self._requests[seq.request_id]
      drawn = [seq]
      if chunk.draws > 1:  # The prompt is done: fork the other outputs.
        children = [
            dataclasses.replace(seq, index=k, seed=seq.seed + k, tokens=list(seq.tokens), forks=1,
                                reserved=[], pages=[], keys=[], slot=-1)
            for k in range(1, chunk.draws)
        ]
        self.scheduler.fork(seq, children, plan.fork_pages.get(id(seq)))
        for child in children:
          request.seqs[child.index] = child
        drawn += children
      for k, s in enumerate(drawn):
        if s.index in request.cancelled:
          self.scheduler.finish(s, "abort")
        else:
          outputs.append(self._emit(request, s, draw, r + k, now))
    return outputs

  def _emit(self, request, seq, draw, row, now) -> RequestOutput:
    token = int(draw.tokens[row])
    seq.tokens.append(token)
    if seq.first_token_time is None:
      seq.first_token_time = now
      self._ttft.append(now - request.arrival)
    else:
      self._itl.append(now - seq.last_token_time)
    seq.last_token_time = now
    self._stats["tokens"] += 1
    logprobs = None
    if seq.params.logprobs is not None:
      top = tuple((int(i), float(lp)) for i, lp in zip(draw.top_ids[
          row, :seq.params.logprobs], draw.top_logprobs[row, :seq.params.logprobs]))
      logprobs = (Logprob(token, float(draw.logprobs[row]), top),)
    reason = None
    if token in seq.stop_ids:
      reason = "stop"
    elif seq.drawn >= seq.params.max_tokens:
      reason = "length"
    if reason is not None:
      self.scheduler.finish(seq, reason)
      request.unfinished.discard(seq.index)
      self._stats["outputs_finished"] += 1
      if not request.unfinished:
        del self._requests[request.request_id]
        self._stats["finished"] += 1
        self._stats["hit_tokens"] += request.seqs[0].hit_tokens
        self._stats["request_prompt_tokens"] += request.prompt_len
    return RequestOutput(request.request_id, seq.index, (token,), logprobs, reason is not None,
                         reason)

  # Whole workloads. --------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               max_steps: int | None = None) -> list[Completion]:
    """Serves `prompts` to the end (with whatever else is queued); returns their completions.

    params: one SamplingParams for all, or one per prompt. max_steps bounds
    the loop (RuntimeError past it); None: 4 * the tokens asked for + 1000.
    """
    if params is None or isinstance(params, SamplingParams):
      params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f"params should be one SamplingParams or one per prompt ({len(prompts)}): "
                       f"but got {len(params)}")
    for prompt, p in zip(prompts, params):
      self.check_request(prompt, p)
    ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
    results = {
        rid: Completion(rid, len(prompt), [[] for _ in range(p.n)],
                        [[] if p.logprobs is not None else None for _ in range(p.n)],
                        [None] * p.n) for rid, prompt, p in zip(ids, prompts, params)
    }
    pending = {(rid, i) for rid, p in zip(ids, params) for i in range(p.n)}
    if max_steps is None:
      max_steps = 4 * sum(p.max_tokens * p.n + len(q) for q, p in zip(prompts, params)) + 1000
    for _ in range(max_steps):
      if not pending:
        break
      for out in self.step():
        result = results.get(out.request_id)
        if result is None:
          continue
        result.token_ids[out.index].extend(out.token_ids)
        if out.logprobs is not None:
          result.logprobs[out.index].extend(out.logprobs)
        if out.finished:
          result.finish_reasons[out.index] = out.finish_reason
          pending.discard((out.request_id, out.index))
    if pending:
      raise RuntimeError(f"generate did not finish in {max_steps} steps")
    return [results[rid] for rid in ids]

  def warmup(self) -> None:
    """Compiles the step for every token bucket, and the decode run (empty batches: no change)."""
    ec = self.engine_config
    sq, pps, num_pages = ec.max_seqs, ec.pages_per_seq, ec.pool_pages

    def empty(tt):
      zeros = np.zeros((sq,), np.int32)
      return step_lib.StepInputs(np.zeros((tt,), np.int32), zeros, np.zeros((sq + 1,), np.int32),
                                 np.int32(0), np.full((sq, pps), paged.NO_PAGE, np.int32), zeros,
                                 self.pool.refs.copy(), zeros, np.full((sq,), num_pages, np.int32),
                                 zeros, np.zeros((sq,), np.uint32), zeros,
                                 np.zeros((sq,), np.float32), zeros, np.ones((sq,), np.float32),
                                 np.zeros((sq,), np.float32))

    for tt in ec.buckets:
      draw, _, self.caches = self._step(self.params, self.caches, empty(tt))
      jax.block_until_ready(draw)
    if ec.decode_steps > 1:
      draw, _, self.caches = self._decode_steps(self.params, self.caches, empty(sq), np.int32(0))
      jax.block_until_ready(draw)

  # Metrics. ----------------------------------------------------------------

  def metrics(self) -> dict[str, float]:
    """A snapshot: counts, throughput, latency percentiles (seconds), occupancy, hit rate.

    Read it between steps (from the thread that steps, or through
    `AsyncEngine.metrics`, which waits for the step in flight).
    """
    s = self._stats
    steps = max(s["steps"], 1)
    out = {
        "requests": s["requests"],
        "requests_finished": s["finished"],
        "requests_aborted": s["aborted"],
        "running": len(self.scheduler.running),
        "waiting": len(self.scheduler.waiting),
        "steps": s["steps"],
        "calls": s["calls"],
        "tokens_generated": s["tokens"],
        "preemptions": s["preemptions"],
        "busy_s": s["busy_s"],
        "generated_tokens_per_busy_s": s["tokens"] / s["busy_s"] if s["busy_s"] else 0.0,
        "step_tokens_mean": s["step_tokens"] / steps,
        "slot_occupancy": s["slot_steps"] / (steps * self.engine_config.max_seqs),
        "page_occupancy": s["page_steps"] / (steps * self.engine_config.pool_pages),
        "pages_in_use": self.pool.in_use,
        "pages_cached": self.pool.cached,
        "prefix_hit_rate":
            (s["hit_tokens"] / s["request_prompt_tokens"] if s["request_prompt_tokens"] else 0.0),
    }
    for name, samples in (("ttft", self._ttft), ("itl", self._itl)):
      values = np.asarray(samples, np.float64)
      for q in (50, 90, 99):
        out[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if values.size else 0.0
    return out
