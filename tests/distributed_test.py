"""Multi-process generation and serving with jax.distributed: two CPU processes, one mesh.

Two subprocesses run tests/distributed_worker.py on 127.0.0.1 with 4 host
devices each and gloo collectives; together they form one data:2 x model:4
mesh. Both must print the tokens and logits of a third, single-process run
on one device. The worker runs only in subprocesses (its absl flags stay out
of this process).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

# Whole programs, models or processes: left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

# absolute(), not resolve(): under Bazel the file is a symlink in the runfiles tree.
_ROOT = pathlib.Path(__file__).absolute().parents[1]
_WORKER = _ROOT / "tests" / "distributed_worker.py"
_TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(num_processes: int) -> tuple[str, list[str]]:
  """Runs a single-process reference and num_processes workers; returns their stdouts.

  Every subprocess is killed if any of them fails or times out.
  """
  env = dict(os.environ)
  # Not the 8 devices of tests/conftest.py: 4 per process, 8 in all.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
  env["JAX_PLATFORMS"] = "cpu"  # Gloo over fake CPU devices, even where a GPU is.
  address = f"127.0.0.1:{_free_port()}"
  commands = [[sys.executable, str(_WORKER)]] + [[
      sys.executable,
      str(_WORKER), f"--coordinator_address={address}", f"--num_processes={num_processes}",
      f"--process_id={i}"
  ] for i in range(num_processes)]
  procs = [
      subprocess.Popen(command, env=env, cwd=_ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True) for command in commands
  ]
  try:
    outputs = [p.communicate(timeout=_TIMEOUT_S)[0] for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail(f"the workers did not finish within {_TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  for command, p, out in zip(commands, procs, outputs):
    assert p.returncode == 0, f"{command[2:]} exited with {p.returncode}:\n{out[-4000:]}"
  return outputs[0], outputs[1:]


def _result(output: str) -> dict:
  lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
  assert len(lines) == 1, output[-4000:]
  return json.loads(lines[0][len("RESULT "):])


def test_two_processes_generate_what_one_process_does():
  reference, outputs = _run_workers(2)
  want = _result(reference)
  assert (want["devices"], want["local_devices"]) == (4, 4)  # It ran on one of them.
  for i, output in enumerate(outputs):
    got = _result(output)
    assert (got["process_id"], got["devices"], got["local_devices"]) == (i, 8, 4)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    # The serving engine: process 0 took the requests; the others followed it.
    assert got["served"] == (want["served"] if i == 0 else None)
  assert [len(outs) for outs in want["served"]] == [1, 2, 1, 1]
