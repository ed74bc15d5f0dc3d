"""The engine's loop in a thread of its own, and each request's outputs as an asyncio stream.

`AsyncEngine` runs `Engine.step()` in one background thread, which sleeps
on a condition while the engine has no work (it never spins) and wakes when
a request arrives, one is cancelled, or the loop is told to stop. asyncio
code submits a request and reads its outputs as they are drawn:

  with AsyncEngine(engine):  # start() ... stop()
    ...
    async for out in async_engine.stream(prompt_ids, SamplingParams(max_tokens=32)):
      print(out.index, out.token_ids, out.finish_reason)

Each request's outputs reach its caller through its own `asyncio.Queue`, fed
from the step thread with `loop.call_soon_threadsafe`. A caller that stops
reading early (it breaks out of the loop, closes the stream, or its task is
cancelled) cancels the request, whose slots and pages are freed at the next
step. A bad request raises ValueError (or TypeError) at submission, in the
caller; an error in the step thread ends the thread and is raised, as a
RuntimeError caused by it, in every caller waiting on a request, and in
every later submission.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import AsyncIterator, Sequence

from kvattn.serving.engine import Engine
from kvattn.serving.engine import RequestOutput
from kvattn.serving.settings import SamplingParams


class RequestStream:
  """One request's outputs, as they are drawn: an async iterator of `RequestOutput`.

  Made by `AsyncEngine.submit`. Iteration ends after the last of the
  request's n outputs finishes. `close()` (or leaving `async with`) before
  then cancels the request. Not thread-safe: read it from the event loop
  that submitted it.
  """
  def __init__(self, owner: AsyncEngine, request_id: str, n: int, queue: asyncio.Queue):
    self.request_id = request_id
    self._owner = owner
    self._queue = queue  # Lists of outputs, or the exception that ends the stream.
    self._ready: collections.deque[RequestOutput] = collections.deque()
    self._unfinished = set(range(n))
    self._closed = False

  @property
  def finished(self) -> bool:
    """True once every output has finished (or the stream was closed or failed)."""
    return self._closed

  def __aiter__(self) -> RequestStream:
    return self

  async def __anext__(self) -> RequestOutput:
    if not self._ready:
      if self._closed:
        raise StopAsyncIteration
      item = await self._queue.get()
      if isinstance(item, BaseException):
        self._closed = True
        raise item
      self._ready.extend(item)
    out = self._ready.popleft()
    if out.finished:
      self._unfinished.discard(out.index)
      if not self._unfinished:
        self._closed = True
    return out

  def close(self) -> None:
    """Cancels the request unless it has finished; later reads end the iteration.

    Synchronous and never awaits, so that it runs whole in a `finally` of a
    cancelled task.
    """
    self._ready.clear()
    if not self._closed:
      self._closed = True
      self._owner.abort(self.request_id)

  def cancel(self, index: int) -> None:
    """Cancels output `index` alone (e.g. it met a stop string); the others go on."""
    if not self._closed and index in self._unfinished:
      self._owner.abort(self.request_id, index)

  async def aclose(self) -> None:
    self.close()

  async def __aenter__(self) -> RequestStream:
    return self

  async def __aexit__(self, *exc_info) -> None:
    self.close()


@dataclasses.dataclass(eq=False)
class _Route:
  """Where the step thread sends one request's outputs, and which are still running."""

  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue
  unfinished: set[int]


class AsyncEngine:
  """Runs an `Engine`'s steps in a background thread; serves asyncio callers.

  Args:
    engine: the engine. While the thread runs it alone calls `engine.step()`;
      submit and cancel requests through this object (a request added to the
      engine directly does not wake a sleeping loop).
    stop_timeout_s: how long `stop()` waits for the thread (a step in
      flight finishes first).
  """
  def __init__(self, engine: Engine, *, stop_timeout_s: float = 60.0):
    if not isinstance(engine, Engine):
      raise TypeError(f"engine should be a kvattn.serving.Engine: but got "
                      f"{type(engine).__name__}")
    if not isinstance(stop_timeout_s, (int, float)) or not stop_timeout_s > 0:
      raise ValueError(f"stop_timeout_s should be a positive number: but got {stop_timeout_s!r}")
    self.engine = engine
    self.stop_timeout_s = stop_timeout_s
    self._cond = threading.Condition()  # Guards the fields below; the thread sleeps on it.
    self._routes: dict[str, _Route] = {}
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._error: BaseException | None = None
    # Held around each step, so that metrics() never reads the engine mid-step.
    self._step_lock = threading.Lock()

  # Life cycle. ----------------------------------------------------------

  @property
  def running(self) -> bool:
    """True while the step thread runs."""
    return self._thread is not None and self._thread.is_alive()

  @property
  def error(self) -> BaseException | None:
    """The exception that ended the step thread, or None."""
    return self._error

  def start(self) -> AsyncEngine:
    """Starts the step thread; returns self. RuntimeError if it runs or failed already."""
    with self._cond:
      if self._error is not None:
        raise RuntimeError(
            "AsyncEngine's step thread failed; make a new Engine and AsyncEngine") from self._error
      if self.running:
        raise RuntimeError("AsyncEngine is running already")
      self._stopping = False
      self._thread = threading.Thread(target=self._run, name="kvattn-engine-step", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the step thread after the step in flight.

    Requests still running are cancelled; their callers get a RuntimeError.
    RuntimeError if the thread does not end within `stop_timeout_s`.
    """
    with self._cond:
      thread = self._thread
      self._stopping = True
      self._cond.notify_all()
    if thread is None:
      return
    thread.join(self.stop_timeout_s)
    if thread.is_alive():
      raise RuntimeError(f"AsyncEngine's step thread did not stop within {self.stop_timeout_s} s")
    self._thread = None
    if self._error is None:
      self.engine.close()  # On a mesh over many hosts: the other processes stop following.

  def __enter__(self) -> AsyncEngine:
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()

  # Requests. ------------------------------------------------------------

  def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
             request_id: str | None = None) -> RequestStream:
    """Queues a request; returns the stream of its outputs. Call it from a running event loop.

    Raises ValueError (or TypeError) for a request the engine cannot serve as
    asked, and RuntimeError if the step thread is not running.
    """
    loop = asyncio.get_running_loop()
    params = SamplingParams() if params is None else params
    with self._cond:
      self._check_running()
      # Under the lock, so that the thread cannot draw for the request before its route exists.
      request_id = self.engine.add_request(prompt, params, request_id)
      queue = asyncio.Queue()
      stream = RequestStream(self, request_id, params.n, queue)
      self._routes[request_id] = _Route(loop, queue, set(range(params.n)))
      self._cond.notify_all()
    return stream

  async def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
                   request_id: str | None = None) -> AsyncIterator[RequestOutput]:
    """Submits a request and yields its outputs as they are drawn, until all n finish.

    A bad request raises ValueError at the first iteration. Closing the
    generator early (or cancelling the task reading it) cancels the request.
    """
    stream = self.submit(prompt, params, request_id)
    try:
      async for out in stream:
        yield out
    finally:
      stream.close()

  def abort(self, request_id: str, index: int | None = None) -> None:
    """Cancels a request, or only its output `index` (thread-safe); finished ones are ignored.

    A request cancelled whole sends nothing more; a cancelled output ends in
    its stream with finish_reason "abort".
    """
    with self._cond:
      if index is None:
        self._routes.pop(request_id, None)
      self.engine.abort(request_id, index)
      self._cond.notify_all()

  def metrics(self) -> dict[str, float]:
    """`Engine.metrics()`, read between steps (thread-safe; blocks for at most one step)."""
    with self._step_lock:
      return self.engine.metrics()

  def _check_running(self) -> None:
    if self._error is not None:
      raise RuntimeError(f"AsyncEngine's step thread failed: {self._error!r}") from self._error
    if not self.running or self._stopping:
      raise RuntimeError("AsyncEngine is not running: call start() first")

  # The step thread. -----------------------------------------------------

  def _run(self) -> None:
    try:
      while True:
        with self._cond:
          while not self._stopping and not self.engine.has_work():
            self._cond.wait()
          if self._stopping:
            break
        with self._step_lock:
          outputs = self.engine.step()
        self._deliver(outputs)
    except BaseException as e:  # Every waiting caller hears of it; nothing hangs.
      with self._cond:
        self._error = e
        routes, self._routes = self._routes, {}
      for route in routes.values():
        self._send(route, _failure(f"the engine's step failed: {e!r}", e))
      return
    self._shut_down()

  def _shut_down(self) -> None:
    """Cancels what is still running when the loop stops; one last step frees its pages."""
    with self._cond:
      routes, self._routes = self._routes, {}
      for request_id in routes:
        self.engine.abort(request_id)
    for request_id, route in routes.items():
      self._send(route, _failure(f"AsyncEngine stopped before request {request_id!r} finished"))
    if routes:
      try:
        with self._step_lock:
          self.engine.step()
      except Exception as e:  # Kept for `error`; nobody is waiting any more.
        self._error = e

  def _deliver(self, outputs: list[RequestOutput]) -> None:
    batches: dict[str, tuple[_Route, list[RequestOutput]]] = {}
    with self._cond:
      for out in outputs:
        route = self._routes.get(out.request_id)
        if route is None:  # Cancelled by its caller, or added to the engine directly.
          continue
        batches.setdefault(out.request_id, (route, []))[1].append(out)
        if out.finished:
          route.unfinished.discard(out.index)
          if not route.unfinished:
            del self._routes[out.request_id]
    for request_id, (route, batch) in batches.items():
      if not self._send(route, batch) and not all(out.finished for out in batch):
        self.abort(request_id)

  @staticmethod
  def _send(route: _Route, item) -> bool:
    """Puts item on the route's queue from this thread; False if its event loop has closed."""
    try:
      route.loop.call_soon_threadsafe(route.queue.put_nowait, item)
    except RuntimeError:
      return False
    return True


def _failure(message: str, cause: BaseException | None = None) -> RuntimeError:
  error = RuntimeError(message)
  error.__cause__ = cause
  return error
