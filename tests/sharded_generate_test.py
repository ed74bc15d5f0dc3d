"""examples/sharded_generate.py runs as the README says and matches one device."""

import os
import pathlib
import subprocess
import sys

import pytest

# Whole programs, models or processes: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

# absolute(), not resolve(): under Bazel the file is a symlink in the runfiles tree.
REPO = pathlib.Path(__file__).absolute().parents[1]


def test_runs_on_eight_host_devices_and_matches_one_device():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env.pop("XLA_FLAGS", None)  # The example's --host_devices must do it alone.
  env["JAX_PLATFORMS"] = "cpu"  # Eight fake CPU devices, even where a GPU is.
  result = subprocess.run([
      sys.executable,
      str(REPO / "examples" / "sharded_generate.py"), "--host_devices=8", "--mesh=data:2,model:4",
      "--layers=1", "--d_model=32", "--max_new_tokens=4", "--prompt_len=8"
  ], capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  out = result.stdout
  assert "mesh {'data': 2, 'model': 4}: 8 devices, 1 process(es)" in out, out
  assert "generated tokens [B, G] = (4, 4):" in out, out
  assert "same tokens as the single-device run" in out, out
