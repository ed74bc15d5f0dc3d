"""The README's and docs/'s code runs as written, and the quick start stays true."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).absolute().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: p.name)
def test_code_blocks_run(path):
  """Every ```python block, each in a fresh namespace (```py blocks are shown, not run)."""
  blocks = _python_blocks(path)
  if path == README:
    assert blocks, "README.md should have a ```python usage example"
  for block in blocks:
    exec(compile(block, str(path), "exec"), {"__name__": "readme"})


def test_docs_exist_and_the_readme_links_every_one():
  assert DOCS, "docs/ should hold the reference pages"
  text = README.read_text()
  for doc in DOCS:
    assert f"(docs/{doc.name})" in text, doc.name
  for link in re.findall(r"\]\((docs/[^)#]+)", text):
    assert (ROOT / link).exists(), link


def test_quick_start_is_two_one_line_commands():
  text = README.read_text()
  quick = re.search(r"## Quick start\n(.*?)\n## ", text, flags=re.DOTALL).group(1)
  commands = re.search(r"```sh\n(.*?)```", quick, flags=re.DOTALL).group(1).strip().splitlines()
  assert len(commands) == 2, commands
  assert re.fullmatch(r"pip install -e '\.\[examples\]' && python examples/\w+\.py",
                      commands[0]), commands[0]
  assert commands[1] == "pip install -e '.[test]' && pytest -q -n auto"
  script = commands[0].split("python ")[-1]
  assert (README.parent / script).exists(), script
