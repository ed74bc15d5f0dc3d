"""The scheduler: which tokens of which sequences run in the next step, and their pages.

Each step has a token budget. Sequences that are decoding (one token to
feed, the last one drawn) come first, in the order they started; then the
prompts being prefilled get chunks of what is left, oldest first; then
waiting requests start, first come first served, while slots, pages and
budget last (chunked prefill: a long prompt runs over several steps beside
the decodes). A request starts with the longest prefix of its prompt found
in the prefix cache (`kvattn.serving.pool`) and prefills the rest.

When a running sequence needs a page and none is left, the sequence that
started last is preempted: its pages and slot are released and it waits at
the head of the queue with the tokens it has drawn, to be prefilled again
(recomputed) when room returns; nothing of the others is touched. A pool of
at least one sequence's pages (`pages_per_seq`) always lets the oldest one
finish, so the schedule always progresses.

A request with n > 1 outputs prefills once, holding n slots; the step that
finishes its prompt draws n tokens from its last logits, and the n - 1
other outputs fork: they share its full pages and get a copy of its last,
partial page.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from kvattn.serving import pool as pool_lib
from kvattn.serving.settings import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
  """One output of a request, and where it stands."""

  request_id: str
  index: int  # Which of the request's n outputs.
  tokens: list[int]  # The prompt, then the tokens drawn.
  prompt_len: int
  params: SamplingParams
  seed: int  # This output's seed.
  stop_ids: frozenset
  arrival: float
  forks: int = 1  # Outputs to draw when the prompt is done: n before the fork, then 1.
  slot: int = -1
  reserved: list[int] = dataclasses.field(default_factory=list)  # Slots held for the forks.
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0  # Tokens in the cache.
  remembered: int = 0  # Leading pages in the prefix cache (taken from it or put there).
  keys: list[bytes] = dataclasses.field(default_factory=list)
  hit_tokens: int = 0  # Prompt tokens the prefix cache gave, at the first start.
  started: bool = False
  preemptions: int = 0
  finish_reason: str | None = None
  first_token_time: float | None = None
  last_token_time: float | None = None

  @property
  def drawn(self) -> int:
    return len(self.tokens) - self.prompt_len


class Chunk(NamedTuple):
  """Tokens `seq.tokens[start:start + count]` run this step; `draws` rows drawn after it."""

  seq: Sequence
  start: int
  count: int
  draws: int  # 0 mid-prompt; 1, or n for a request that forks after its prompt.


class Plan(NamedTuple):
  """One step: the chunks in batch order, and the page copies of the forks after it."""

  chunks: list[Chunk]
  copies: list[tuple[int, int]]  # (source page, destination page)
  fork_pages: dict[int, list[int]]  # id(parent) -> the forks' partial-page copies.
  preempted: list[Sequence]


class Scheduler:
  """Owns the waiting queue, the running sequences, the slots and the page pool."""
  def __init__(self, max_seqs: int, pages_per_seq: int, token_budget: int, pool: pool_lib.PagePool):
    self.max_seqs = max_seqs
    self.pages_per_seq = pages_per_seq
    self.token_budget = token_budget
    self.pool = pool
    self.page_size = pool.page_size
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []  # In the order they started.
    self.free_slots = list(range(max_seqs))

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def pages_for(self, seq: Sequence, end: int) -> int:
    return -(-end // self.page_size) - len(seq.pages)

  def grow(self, seq: Sequence, end: int, extra: int = 0) -> list[int] | None:
    """Allocates the pages seq needs to hold `end` tokens, plus `extra`; None if too few."""
    need = self.pages_for(seq, end)
    got = self.pool.allocate(need + extra)
    if got is None:
      return None
    seq.pages.extend(got[:need])
    return got[need:]

  def release(self, seq: Sequence) -> None:
    """Gives back seq's pages and slots (finished, cancelled or preempted)."""
    self.pool.release(seq.pages)
    seq.pages = []
    for slot in ([seq.slot] if seq.slot >= 0 else []) + seq.reserved:
      self.free_slots.append(slot)
    seq.slot, seq.reserved = -1, []
    seq.computed = seq.remembered = 0
    seq.keys = []

  def preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    self.release(seq)
    seq.preemptions += 1
    self.waiting.appendleft(seq)

  def drop(self, seq: Sequence) -> None:
    """Removes seq wherever it is, releasing what it holds."""
    if seq in self.running:
      self.running.remove(seq)
      self.release(seq)
    elif seq in self.waiting:
      self.waiting.remove(seq)

  def _start(self, seq: Sequence) -> bool:
    """Gives a waiting sequence its slots and its prefix-cache hit; False if no slots."""
    if len(self.free_slots) < seq.forks:
      return False
    self.free_slots.sort()
    seq.slot = self.free_slots.pop(0)
    seq.reserved = [self.free_slots.pop(0) for _ in range(seq.forks - 1)]
    # Leave at least one token to run: its logits draw the next token.
    usable = (len(seq.tokens) - 1) // self.page_size
    seq.keys = pool_lib.page_keys(seq.tokens, self.page_size, usable)
    seq.pages = self.pool.lookup(seq.keys)
    seq.computed = len(seq.pages) * self.page_size
    seq.remembered = len(seq.pages)
    if not seq.started:
      seq.hit_tokens = seq.computed
    return True

  def _unstart(self, seq: Sequence) -> None:
    self.pool.hits -= seq.remembered
    self.release(seq)

  def schedule(self) -> Plan:
    budget = self.token_budget
    chunks, copies, fork_pages, preempted = [], [], {}, []

    scheduled = set()

    def room(seq, make):
      """make() until it fits, preempting the newest sequence not scheduled yet.

      None when seq itself was the one to go, or nothing is left to preempt.
      """
      while (made := make()) is None:
        victims = [s for s in self.running if id(s) not in scheduled]
        if not victims:
          return None
        self.preempt(victims[-1])
        preempted.append(victims[-1])
        if victims[-1] is seq:
          return None
      scheduled.add(id(seq))
      return made

    # Decodes first, oldest first (a decode is the one token drawn last).
    for seq in list(self.running):
      if seq in self.running and seq.drawn > 0 and seq.computed == len(seq.tokens) - 1:
        if room(seq, lambda seq=seq: self.grow(seq, seq.computed + 1)) is not None:
          chunks.append(Chunk(seq, seq.computed, 1, 1))
          budget -= 1
    # Then the prompts being prefilled, oldest first.
    for seq in list(self.running):
      if budget <= 0:
        break
      if seq not in self.running or id(seq) in scheduled:
        continue
      chunk = room(seq, lambda seq=seq: self._prefill_chunk(seq, budget, copies, fork_pages))
      if chunk is not None:
        chunks.append(chunk)
        budget -= chunk.count
    # Then waiting requests, first come first served, without preempting.
    while self.waiting and budget > 0:
      seq = self.waiting[0]
      if not self._start(seq):
        break
      chunk = self._prefill_chunk(seq, budget, copies, fork_pages)
      if chunk is None:
        self._unstart(seq)
        break
      self.waiting.popleft()
      seq.started = True
      self.running.append(seq)
      chunks.append(chunk)
      budget -= chunk.count
    return Plan(chunks, copies, fork_pages, preempted)

  def _prefill_chunk(self, seq, budget, copies, fork_pages) -> Chunk | None:
    count = min(len(seq.tokens) - seq.computed, budget)
    end = seq.computed + count
    done = end == len(seq.tokens)
    # A fork of a partial last page gets its own copy of it, allocated now.
    extra = seq.forks - 1 if done and end % self.page_size else 0
    got = self.grow(seq, end, extra)
    if got is None:
      return None
    if extra:
      fork_pages[id(seq)] = got
      copies.extend((seq.pages[-1], page) for page in got)
    return Chunk(seq, seq.computed, count, seq.forks if done else 0)

  def remember_pages(self, seq: Sequence) -> None:
    """Puts seq's newly full, computed pages in the prefix cache."""
    full = seq.computed // self.page_size
    if full <= seq.remembered:
      return
    if len(seq.keys) < full:
      seq.keys = pool_lib.page_keys(seq.tokens, self.page_size, full)
    for i in range(seq.remembered, full):
      self.pool.remember(seq.keys[i], seq.pages[i])
    seq.remembered = full

  def fork(self, parent: Sequence, children: list[Sequence], copies: list[int] | None) -> None:
    """Gives the children the parent's reserved slots and its pages (shared, last one copied)."""
    full = parent.computed // self.page_size
    for i, child in enumerate(children):
      child.slot = parent.reserved[i]
      shared = parent.pages[:full] if copies else list(parent.pages)
      self.pool.share(shared)
      child.pages = shared + ([copies[i]] if copies else [])
      child.computed = parent.computed
      child.remembered = parent.remembered
      child.keys = list(parent.keys)
      child.started = True
      self.running.append(child)
    parent.reserved = []
    parent.forks = 1

  def finish(self, seq: Sequence, reason: str) -> None:
    seq.finish_reason = reason
    self.drop(seq)
