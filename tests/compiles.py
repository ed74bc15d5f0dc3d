"""Counting XLA compilations of a jitted function, for the compile-once tests.

`jitted._cache_size()` counts dispatch-cache entries instead: numpy and jax
arguments of one shape make two entries but one compilation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax


@contextlib.contextmanager
def compilations(name: str | None = None) -> Iterator[list[str]]:
  """Yields a list that gets one entry per XLA compilation in the block.

  With `name`, only compilations of `jit(name)` count (entries: `name`);
  without, every compilation does (entries: "jit(f)" for each function f).
  """
  compiled = []

  def listen(event, duration, **kw):
    del duration
    if event != "/jax/core/compile/backend_compile_duration":
      return
    if name is None:
      compiled.append(kw.get("fun_name"))
    elif kw.get("fun_name") == f"jit({name})":
      compiled.append(name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield compiled
  finally:
    _unregister(listen)


def _unregister(listen) -> None:
  unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
  if unregister is None:  # jax < 0.7 has only the private function.
    from jax._src import monitoring  # pylint: disable=g-import-not-at-top
    unregister = monitoring._unregister_event_duration_listener_by_callback  # pylint: disable=protected-access
  unregister(listen)
