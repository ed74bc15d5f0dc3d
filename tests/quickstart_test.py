"""Smoke test: examples/quickstart.py runs and prints what the README promises."""

import os
import pathlib
import subprocess
import sys

import pytest

# Whole programs, models or processes: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).absolute().parent.parent


def test_quickstart_runs():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  result = subprocess.run([
      sys.executable,
      str(ROOT / "examples" / "quickstart.py"), "--layers=1", "--decode_steps=4", "--prompt_len=8",
      "--d_model=32", "--heads=4", "--kv_heads=2"
  ], capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr
  assert "generated tokens [B, N]    : (4, 4), cache index 11" in result.stdout
  assert "overflowed                 : False" in result.stdout
  assert "tokens/s" in result.stdout
