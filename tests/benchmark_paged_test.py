"""Smoke test: examples/benchmark_paged.py runs with tiny sizes and prints its three tables."""

import os
import pathlib
import subprocess
import sys

import pytest

# A whole program: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).absolute().parent.parent


def test_benchmark_paged_runs_quick():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "benchmark_paged.py"), "--quick"],
      capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr
  for title in ("## Decode step: paged against dense", "## A mixed step", "## Memory held"):
    assert title in result.stdout, result.stdout
  assert "Goal: paged decode within 1.2x of dense at every fill:" in result.stdout
