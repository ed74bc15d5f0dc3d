"""Many hosts: process 0 takes the requests and sends each step's arrivals to the others.

On a mesh over several processes (`jax.distributed`), every process must
run the same compiled step on the same inputs. The engine's schedule is a
function of the requests and cancellations alone, so each step process 0
broadcasts what arrived since the last one (`broadcast`, through
`jax.experimental.multihost_utils`, i.e. jax's own collectives) and every
process applies it and schedules alike.
"""

from __future__ import annotations

import json
from typing import Any

from jax.experimental import multihost_utils
import numpy as np


def broadcast(messages: list[Any]) -> list[Any]:
  """Process 0's `messages` (JSON-able), on every process; the others' own are dropped."""
  payload = np.frombuffer(json.dumps(messages).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray([payload.size], np.int64))[0])
  if size == 0:
    return []
  buffer = np.zeros((size,), np.uint8)
  buffer[:min(size, payload.size)] = payload[:size]
  data = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
  return [tuple(m) for m in json.loads(data.tobytes().decode())]
