"""Test configuration shared by every test file.

Eight fake CPU devices let the multi-device tests build a mesh on one CPU.
XLA reads its flags once, when jax initialises its backend, so they are set
here, before any test module imports jax.

The tests compile hundreds of small programs and run each briefly, so XLA's
expensive CPU optimisations are turned off for them: about 30% less time on 2
cores. Numerics are unaffected (same operations, less fusion work); speed is
measured in examples/benchmark.py, never here.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing] +
                                   [f for f in _FLAGS if f.split("=")[0] not in _existing]).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS is set)

if hasattr(jax.config, "jax_num_cpu_devices"):  # The flag's successor, where jax has it.
  try:
    jax.config.update("jax_num_cpu_devices", 8)
  except RuntimeError:  # A backend already started (XLA_FLAGS above still gave it 8 devices).
    pass

# Catch accidental broadcasting between arrays of different rank, and mixed
# dtypes promoted silently (as Equinox's tests do).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The float64 comparisons assume float32 matmuls. JAX's default is TF32 on
# NVIDIA GPUs (about 1e-3 relative) and bfloat16 passes on TPU; on CPU this
# changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's compiled programs after each test file.

  Each XLA:CPU executable keeps about 20 memory mappings, and the suite
  compiles thousands of programs in one process: past the kernel's
  vm.max_map_count (65530 by default) the compiler segfaults. Clearing the
  caches between files keeps the count to one file's programs.
  """
  yield
  jax.clear_caches()
