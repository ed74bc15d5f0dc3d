"""Runs one test file under pytest: the main of every kvattn_py_test (build_defs.bzl).

    python tests/pytest_main.py tests/cache_test.py [PYTEST_ARGS...]

Exits with pytest's code, so that Bazel's test fails when a test fails or none
is collected (pytest's 5). With no file, or a file that is not there, it
fails too: a runner that passed then would pass tests that never ran.
"""

import pathlib
import sys

import pytest


def main(argv: list[str]) -> int:
  if not argv or not argv[0].endswith(".py") or not pathlib.Path(argv[0]).is_file():
    print(f"usage: pytest_main.py TEST_FILE.py [PYTEST_ARGS...]: no test file in {argv}",
          file=sys.stderr)
    return 2
  return int(pytest.main(argv))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
