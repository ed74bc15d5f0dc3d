"""Smoke test of examples/benchmark_serving.py: its modes on a tiny stream with the bundled model.

One small engine (3 token buckets) and one static shape keep the compiles
few; every mode serves the same 6 requests, all at once.
"""

import numpy as np
import pytest

from examples import benchmark_serving as bench
from kvattn import serving
from kvattn.models import charlm

# Compiles an engine and the static shapes: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

ENGINE = serving.EngineConfig(max_seqs=4, max_len=64, page_size=8, token_budget=32)


@pytest.fixture(scope="module")
def stream():
  params, config, _ = charlm.load()
  requests = bench.make_workload(6, vocab_size=config.vocab_size, prompt_len=(4, 20),
                                 output_len=(2, 12), shared_prefix_share=0.5, shared_prefix_len=16,
                                 num_prefixes=1, seed=3)
  runs = bench.serve_modes({
      "continuous": lambda: bench.run_engine(params, config, requests, ENGINE),
      "static": lambda: bench.run_static(params, config, requests, ENGINE.max_seqs),
      "static, streamed": lambda: bench.run_static(params, config, requests, ENGINE.max_seqs, stream
                                                   =True),
  })
  return requests, {r.mode: r for r in runs}


def test_workload_is_deterministic_and_in_range():
  a = bench.make_workload(20, vocab_size=50, rate=10.0, seed=1)
  b = bench.make_workload(20, vocab_size=50, rate=10.0, seed=1)
  assert a == b
  assert a != bench.make_workload(20, vocab_size=50, rate=10.0, seed=2)
  assert a[0].arrival == 0.0 and all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
  for r in a:
    own = len(r.prompt) - (128 if r.prefix >= 0 else 0)
    assert 8 <= own <= 256 and 4 <= r.max_tokens <= 256
    assert all(1 <= t < 50 for t in r.prompt)
  shared = [r for r in a if r.prefix >= 0]
  assert shared and all(
      len({r.prompt[:128] for r in shared if r.prefix == p}) == 1
      for p in {r.prefix for r in shared})
  assert all(r.arrival == 0.0 for r in bench.make_workload(5, vocab_size=50, seed=1))


def test_every_request_gets_its_tokens(stream):
  requests, runs = stream
  assert set(runs) == {"continuous", "static", "static, streamed"}
  bench.check_runs(list(runs.values()), requests)
  for run in runs.values():
    assert run.generated == sum(r.max_tokens for r in requests)
    assert np.all(run.ttft >= 0) and run.wall > 0
    assert 0 < run.slot_occupancy <= 1 and 0 < run.page_occupancy <= 1
  assert runs["continuous"].prefix_hit_rate > 0  # The shared prefix's 2 pages are reused.


def test_static_greedy_tokens_equal_the_engines(stream):
  requests, runs = stream
  for i, _ in enumerate(requests):
    assert runs["static"].tokens[i] == runs["continuous"].tokens[i], i
    assert runs["static, streamed"].tokens[i] == runs["continuous"].tokens[i], i


def test_tables_have_a_row_per_mode(stream):
  requests, runs = stream
  table = bench.results_table(list(runs.values()))
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert [row.split(" | ")[0][2:] for row in rows[2:]] == list(runs)
  assert "| continuous | 6 |" in table
  ratios = bench.ratio_table(list(runs.values()))
  assert "| static |" in ratios and "| static, streamed |" in ratios
  assert "| continuous |" in bench.prefix_table(list(runs.values()), requests)
