"""Serving: a continuous-batching engine over a model's paged step, and its OpenAI-style front.

  * `kvattn.serving.settings`: `SamplingParams`, a request's settings, and their checks.
  * `kvattn.serving.sampler`: per-row draws (temperature, top-k, top-p, min-p, seed, logprobs).
  * `kvattn.serving.pool`: the host's page pool with the prefix cache.
  * `kvattn.serving.scheduler`: the token budget, chunked prefill, preemption, forks.
  * `kvattn.serving.step`: the one compiled device function.
  * `kvattn.serving.engine`: `Engine`, the loop, warmup and metrics.
  * `kvattn.serving.async_engine`: `AsyncEngine`, the loop in a thread for asyncio.
  * `kvattn.serving.hosts`: many hosts: process 0's arrivals sent to the others each step.
  * `kvattn.serving.text`: tokenizers and chat templates for the server.
  * `kvattn.serving.openai_api`: an OpenAI-compatible HTTP app (FastAPI; the `serve` extra).

See docs/serving.md.
"""

from kvattn.serving.async_engine import AsyncEngine
from kvattn.serving.engine import Completion
from kvattn.serving.engine import Engine
from kvattn.serving.engine import EngineConfig
from kvattn.serving.engine import Logprob
from kvattn.serving.engine import RequestOutput
from kvattn.serving.settings import SamplingParams

__all__ = [
    "AsyncEngine",
    "Completion",
    "Engine",
    "EngineConfig",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]
