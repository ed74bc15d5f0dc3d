"""Test configuration shared by every test file.

Eight fake CPU devices let the multi-device tests build a mesh on one CPU.
XLA reads the flag once, when jax initialises its backend, so it is set here,
before any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS is set)

# Catch accidental broadcasting between arrays of different rank.
jax.config.update("jax_numpy_rank_promotion", "raise")
