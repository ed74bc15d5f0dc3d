"""The linter's step: pyflakes finds nothing, and the package's lines fit 100 columns.

pyflakes (unused imports and variables, undefined names, redefinitions) runs
over the package, the examples and the tests; the line limit holds for the
package and the examples (tests keep long regular expressions whole).
"""

import io
import pathlib

from pyflakes import api
from pyflakes import reporter as reporter_lib

ROOT = pathlib.Path(__file__).absolute().parent.parent
MAX_COLUMNS = 100


def _sources(*folders):
  return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_pyflakes_finds_nothing():
  out, err = io.StringIO(), io.StringIO()
  reporter = reporter_lib.Reporter(out, err)
  count = sum(api.checkPath(str(path), reporter) for path in _sources("kvattn", "examples",
                                                                      "tests"))
  assert count == 0, out.getvalue() + err.getvalue()


def test_lines_fit_the_column_limit():
  long = [f"{path.relative_to(ROOT)}:{number}: {len(line)} columns"
          for path in _sources("kvattn", "examples")
          for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
          if len(line) > MAX_COLUMNS]
  assert not long, "\n".join(long)
