"""kvattn_py_test: one tests/*_test.py under pytest, as a Bazel py_test.

A py_test runs its `main` file as a script, and a test file run as a script
defines its tests and exits 0 without running one. So no test file is a
main: every test target runs tests/pytest_main.py, which runs pytest on the
file named by the target (`kvattn_py_test(name = "x_test", ...)` runs
tests/x_test.py) and fails when that file is missing or no test passes.
tests/build_test.py checks that BUILD uses this macro for every test file and
that this file still wires it so.
"""

load("@rules_python//python:defs.bzl", "py_test")

# tests/conftest.py's XLA flags (tests/build_test.py keeps the two equal).
# pytest loads conftest.py before the test file, so it sets them in time
# under Bazel too; the env keeps them for any py_test that runs a script
# without pytest (:benchmark_smoke_test) and in jax's subprocesses.
TEST_ENV = {"XLA_FLAGS": " ".join([
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
])}

_RUNNER = "tests/pytest_main.py"

def kvattn_py_test(name, size, deps = [], data = [], tags = [], **kwargs):
    """A py_test running pytest on tests/<name>.py.

    Args:
      name: the test file's name without .py, e.g. "cache_test".
      size: Bazel's test size, required ("small", "medium", "large").
      deps: py_library targets the file imports (`:conftest`, which pytest
        loads, is added).
      data: what the test runs or reads: py_binary targets, files.
      tags: e.g. ["ci_bazel"] for the tests CI runs under Bazel.
      **kwargs: any other py_test attribute (timeout, flaky, shard_count...).
    """
    src = "tests/%s.py" % name
    py_test(
        name = name,
        size = size,
        srcs = [src, _RUNNER],
        main = _RUNNER,
        args = ["$(rootpath %s)" % src],
        env = TEST_ENV,
        deps = [":conftest"] + [dep for dep in deps if dep != ":conftest"],
        data = data,
        tags = tags,
        **kwargs
    )
