"""The README's usage example runs as written, and its quick start stays true."""

import pathlib
import re
import sys

import pytest

README = pathlib.Path(__file__).absolute().parent.parent / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_usage_example_runs():
  blocks = _python_blocks()
  assert blocks, "README.md should have a ```python usage example"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_quick_start_is_two_one_line_commands():
  text = README.read_text()
  quick = re.search(r"## Quick start\n(.*?)\n## ", text, flags=re.DOTALL).group(1)
  commands = re.search(r"```sh\n(.*?)```", quick, flags=re.DOTALL).group(1).strip().splitlines()
  assert len(commands) == 2, commands
  assert re.fullmatch(r"pip install -e \. && python examples/\w+\.py", commands[0]), commands[0]
  assert commands[1] == "pip install -e '.[test]' && pytest -q"
  script = commands[0].split("python ")[-1]
  assert (README.parent / script).exists(), script


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
