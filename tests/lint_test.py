"""The linter's and the formatter's step: pyflakes finds nothing, yapf changes nothing.

pyflakes (unused imports and variables, undefined names, redefinitions) runs
over the package, the examples and the tests, and so does yapf, the
formatter, with pyproject.toml's [tool.yapf] style (Google's, 2 spaces, 100
columns): a file it would change fails, with the diff. `yapf -i -r kvattn
examples tests` formats them. The line limit holds for the package and the
examples (yapf leaves long strings whole; tests keep long regular expressions).
"""

import io
import pathlib

from pyflakes import api
from pyflakes import reporter as reporter_lib
from yapf.yapflib import file_resources
from yapf.yapflib import yapf_api

ROOT = pathlib.Path(__file__).absolute().parent.parent
MAX_COLUMNS = 100


def _sources(*folders):
  return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_pyflakes_finds_nothing():
  out, err = io.StringIO(), io.StringIO()
  reporter = reporter_lib.Reporter(out, err)
  count = sum(
      api.checkPath(str(path), reporter) for path in _sources("kvattn", "examples", "tests"))
  assert count == 0, out.getvalue() + err.getvalue()


def test_lines_fit_the_column_limit():
  long = [
      f"{path.relative_to(ROOT)}:{number}: {len(line)} columns"
      for path in _sources("kvattn", "examples")
      for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
      if len(line) > MAX_COLUMNS
  ]
  assert not long, "\n".join(long)


def test_yapf_changes_nothing():
  style = file_resources.GetDefaultStyleForDir(str(ROOT))
  diffs = []
  for path in _sources("kvattn", "examples", "tests"):
    diff, _, changed = yapf_api.FormatFile(str(path), style_config=style, print_diff=True)
    if changed:
      diffs.append(diff)
  assert not diffs, "yapf -i -r kvattn examples tests would change:\n" + "".join(diffs)[:5000]
