"""No test escapes Bazel: BUILD has a py_test for every tests/*_test.py.

Under Bazel a py_test runs only its `main` file, and a main without an
`if __name__ == "__main__":` block that calls pytest.main (or unittest.main)
PASSES WITHOUT RUNNING ANYTHING. So every test file needs both a py_test
target whose main is that file and such a block. Every module and example
needs a target too, so that `bazel build //...` builds the whole tree.

BUILD is Starlark, whose syntax is a subset of Python's: `ast` parses it.
"""

import ast
import pathlib
import re
import sys

import pytest

# Not resolve(): under Bazel this file is a symlink in the runfiles tree, and
# BUILD plus the files it checks are data next to it there.
ROOT = pathlib.Path(__file__).absolute().parent.parent

_RULES = ("py_binary", "py_library", "py_test")
_RUNNERS = ("pytest.main", "unittest.main", "absltest.main")


def _literal(node: ast.expr):
  """A string or list-of-strings attribute; None for globs and other expressions."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    return None


def parse_targets(build_text: str) -> list[dict]:
  """The py_* rule calls in a BUILD file: name, rule, srcs, deps, data, main, size."""
  targets = []
  for node in ast.walk(ast.parse(build_text, filename="BUILD")):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and
            node.func.id in _RULES):
      continue
    attrs = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    srcs = attrs.get("srcs") or []
    targets.append({
        "rule": node.func.id,
        "name": attrs.get("name"),
        "srcs": list(srcs) if isinstance(srcs, list) else [],
        "deps": list(attrs.get("deps") or []),
        "data": list(attrs.get("data") or []) if isinstance(attrs.get("data"), list) else [],
        "main": attrs.get("main"),
        "size": attrs.get("size"),
    })
  return targets


def has_main_block(source: str) -> bool:
  """Whether a module ends in `if __name__ == "__main__":` that runs a test runner."""
  for node in ast.parse(source).body:
    if not isinstance(node, ast.If):
      continue
    test = node.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and
            isinstance(test.ops[0], ast.Eq)):
      continue
    sides = {ast.unparse(test.left), ast.unparse(test.comparators[0])}
    if sides != {"__name__", "'__main__'"}:
      continue
    calls = {ast.unparse(call.func) for stmt in node.body for call in ast.walk(stmt)
             if isinstance(call, ast.Call)}
    if calls & set(_RUNNERS):
      return True
  return False


def bazel_test_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Every tests/*_test.py without a sized py_test (main = the file) or a __main__ block."""
  targets = parse_targets(build_text)
  by_main = {t["main"]: t for t in targets if t["rule"] == "py_test"}
  problems = []
  for path in sorted(root.glob("tests/*_test.py")):
    rel = path.relative_to(root).as_posix()
    target = by_main.get(rel)
    if target is None:
      problems.append(f"{rel}: no py_test in BUILD with main = {rel!r}")
    else:
      if rel not in target["srcs"]:
        problems.append(f"{rel}: py_test {target['name']!r} does not list it in srcs")
      if target["size"] is None:
        problems.append(f"{rel}: py_test {target['name']!r} has no size")
    if not has_main_block(path.read_text(encoding="utf-8")):
      problems.append(f'{rel}: no `if __name__ == "__main__":` block calling pytest.main '
                      "(under Bazel the test would pass without running)")
  return problems


def module_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Every kvattn/, examples/ and tests/ module (test files aside) in no target's srcs."""
  covered = {src for t in parse_targets(build_text) for src in t["srcs"]}
  modules = sorted(p.relative_to(root).as_posix()
                   for d in ("kvattn", "examples", "tests") for p in (root / d).rglob("*.py")
                   if not p.name.endswith("_test.py"))
  return [f"{rel}: in no target's srcs in BUILD" for rel in modules if rel not in covered]


_PACKAGES = ("kvattn", "examples", "tests")


def imported_files(root: pathlib.Path, source: str) -> tuple[set[str], set[str]]:
  """The project files a module imports at module level, and the package __init__s.

  Returns (modules, inits): `from kvattn import sampling` gives
  kvattn/sampling.py in modules and kvattn/__init__.py in inits. A target
  must depend on its modules; it may depend on the inits (without one, Bazel
  puts an empty __init__.py in the runfiles). Imports inside functions are
  left out: they break an import cycle (kvattn/_checks.py) or load an
  optional extra, and a BUILD cannot have a cycle.
  """
  modules, inits = set(), set()

  def add(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] not in _PACKAGES:
      return False
    for i in range(1, len(parts)):
      inits.add("/".join(parts[:i]) + "/__init__.py")
    if (root / ("/".join(parts) + ".py")).exists():
      modules.add("/".join(parts) + ".py")
      return True
    if (root / "/".join(parts) / "__init__.py").exists():
      modules.add("/".join(parts) + "/__init__.py")
      return True
    return False

  def visit(body):
    for node in body:
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(alias.name)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if not any([add(f"{node.module}.{alias.name}") for alias in node.names]):
          add(node.module)
      elif isinstance(node, (ast.If, ast.Try)):
        visit(node.body)
        visit(node.orelse)
        for handler in getattr(node, "handlers", []):
          visit(handler.body)
        visit(getattr(node, "finalbody", []))

  visit(ast.parse(source).body)
  return modules, inits - modules


def dep_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Targets whose deps are not what their sources import.

  Every imported project module must be in the target's own srcs or in a
  direct dep's srcs, and every dep must provide an imported module or package
  __init__, except :conftest, which pytest loads rather than the test. What a
  target runs or reads (an example run as a subprocess, code in the README)
  goes in `data`, which this does not check.
  """
  targets = {t["name"]: t for t in parse_targets(build_text)}
  problems = []
  for name, target in sorted(targets.items()):
    modules, inits = set(), set()
    for src in target["srcs"]:
      if (root / src).exists():
        m, i = imported_files(root, (root / src).read_text(encoding="utf-8"))
        modules, inits = modules | m, inits | i
    deps = [d.lstrip(":") for d in target["deps"]]
    provided = {src: dep for dep in deps for src in targets.get(dep, {}).get("srcs", [])}
    for rel in sorted(modules - set(target["srcs"]) - set(provided)):
      problems.append(f":{name} imports {rel} but no direct dep has it in srcs")
    used = {provided[rel] for rel in modules | inits if rel in provided}
    for dep in deps:
      if dep not in used and dep != "conftest":
        problems.append(f":{name} depends on :{dep} but imports none of its srcs")
  return problems


def readme_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Modules the ```python blocks of the README and docs/ import that :readme_test lacks in data.

  tests/readme_test.py runs those blocks, so their imports are runtime deps:
  targets in its data.
  """
  targets = {t["name"]: t for t in parse_targets(build_text)}
  blocks = [block for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
            for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"),
                                    flags=re.DOTALL)]
  modules = set()
  for block in blocks:
    modules |= imported_files(root, block)[0]
  data = targets.get("readme_test", {}).get("data", [])
  provided = {src for d in data for src in targets.get(d.lstrip(":"), {}).get("srcs", [])}
  return [f":readme_test runs README code importing {rel}; no target in its data has it"
          for rel in sorted(modules - provided)]


def env_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """py_tests without `env = TEST_ENV`, or a TEST_ENV whose XLA flags differ from conftest's."""
  tree = ast.parse(build_text, filename="BUILD")
  flags = None
  for node in tree.body:
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
        "TEST_ENV"]:
      value = node.value.values[node.value.keys.index(
          next(k for k in node.value.keys if ast.literal_eval(k) == "XLA_FLAGS"))]
      flags = tuple(ast.literal_eval(value.args[0]))  # " ".join([...])
  conftest = ast.parse((root / "tests" / "conftest.py").read_text(encoding="utf-8"))
  want = next(ast.literal_eval(n.value) for n in conftest.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", None) == "_FLAGS")
  problems = [] if flags == tuple(want) else [
      f"BUILD: TEST_ENV's XLA_FLAGS {flags} differ from tests/conftest.py's {tuple(want)}"]
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "py_test":
      env = next((kw.value for kw in node.keywords if kw.arg == "env"), None)
      name = next(ast.literal_eval(kw.value) for kw in node.keywords if kw.arg == "name")
      if getattr(env, "id", None) != "TEST_ENV":
        problems.append(f"py_test {name!r} has no `env = TEST_ENV`")
  return problems


def _build_text() -> str:
  return (ROOT / "BUILD").read_text(encoding="utf-8")


def test_every_test_file_runs_under_bazel():
  assert (ROOT / "tests" / "build_test.py").exists()
  problems = bazel_test_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_every_module_has_a_target():
  problems = module_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_readme_code_has_its_modules_in_data():
  problems = readme_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_deps_are_what_the_sources_import():
  problems = dep_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


# --- The checks themselves catch what they should.

_GOOD_TEST = 'import sys\nimport pytest\n\nif __name__ == "__main__":\n  sys.exit(pytest.main([__file__]))\n'
_GOOD_BUILD = """
load("@rules_python//python:defs.bzl", "py_test")

py_test(
    name = "a_test",
    size = "small",
    srcs = ["tests/a_test.py"],
    main = "tests/a_test.py",
    deps = [":conftest"],
)
"""


@pytest.fixture
def tree(tmp_path):
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "a_test.py").write_text(_GOOD_TEST)
  return tmp_path


def test_check_passes_a_good_tree(tree):
  assert bazel_test_problems(tree, _GOOD_BUILD) == []


def test_check_fails_without_a_py_test(tree):
  (tree / "tests" / "b_test.py").write_text(_GOOD_TEST)
  assert bazel_test_problems(tree, _GOOD_BUILD) == [
      "tests/b_test.py: no py_test in BUILD with main = 'tests/b_test.py'"]


def test_check_fails_when_main_points_elsewhere(tree):
  build = _GOOD_BUILD.replace('main = "tests/a_test.py"', 'main = "tests/other.py"')
  assert bazel_test_problems(tree, build) == [
      "tests/a_test.py: no py_test in BUILD with main = 'tests/a_test.py'"]


def test_check_fails_without_size_or_src(tree):
  build = _GOOD_BUILD.replace('    size = "small",\n', "").replace('"tests/a_test.py"]', "]")
  assert bazel_test_problems(tree, build) == [
      "tests/a_test.py: py_test 'a_test' does not list it in srcs",
      "tests/a_test.py: py_test 'a_test' has no size",
  ]


@pytest.mark.parametrize("source", [
    "import pytest\n\ndef test_x():\n  pass\n",
    'if __name__ == "__main__":\n  print("hi")\n',
    'if __name__ != "__main__":\n  pytest.main([__file__])\n',
    'def f():\n  if __name__ == "__main__":\n    pytest.main([__file__])\n',
])
def test_check_fails_without_main_block(tree, source):
  (tree / "tests" / "a_test.py").write_text(source)
  [problem] = bazel_test_problems(tree, _GOOD_BUILD)
  assert problem.startswith('tests/a_test.py: no `if __name__ == "__main__":` block')


@pytest.mark.parametrize("source", [
    _GOOD_TEST,
    "if '__main__' == __name__:\n  unittest.main()\n",
    'if __name__ == "__main__":\n  absltest.main()\n',
])
def test_main_block_variants(source):
  assert has_main_block(source)


def test_module_check_fails_for_a_module_without_target(tree):
  assert module_problems(tree, _GOOD_BUILD) == []
  (tree / "kvattn").mkdir()
  (tree / "kvattn" / "new.py").write_text("")
  (tree / "tests" / "helper.py").write_text("")
  assert module_problems(tree, _GOOD_BUILD) == [
      "kvattn/new.py: in no target's srcs in BUILD",
      "tests/helper.py: in no target's srcs in BUILD",
  ]


def test_dep_check_fails_for_a_missing_or_unused_dep(tmp_path):
  (tmp_path / "kvattn").mkdir()
  (tmp_path / "kvattn" / "__init__.py").write_text("from kvattn.a import f\n")
  (tmp_path / "kvattn" / "a.py").write_text("def f():\n  from kvattn import b  # lazy: ignored\n")
  (tmp_path / "kvattn" / "b.py").write_text("import jax\nfrom kvattn import a\n")
  (tmp_path / "kvattn" / "c.py").write_text("import kvattn.a\nimport kvattn.b\n")
  build = """
py_library(name = "a", srcs = ["kvattn/a.py"])
py_library(name = "b", srcs = ["kvattn/b.py"], deps = [":a"])
py_library(name = "c", srcs = ["kvattn/c.py"], deps = [":b"])
py_library(name = "kvattn", srcs = ["kvattn/__init__.py"], deps = [":a"])
"""
  assert dep_problems(tmp_path, build) == [
      ":c imports kvattn/a.py but no direct dep has it in srcs"]
  fixed = build.replace('deps = [":b"]', 'deps = [":a", ":b"]')
  assert dep_problems(tmp_path, fixed) == []
  # Depending on the package's __init__ target is allowed, not required.
  assert dep_problems(tmp_path, fixed.replace('deps = [":a", ":b"]',
                                              'deps = [":a", ":b", ":kvattn"]')) == []
  assert dep_problems(tmp_path, fixed.replace('deps = [":a"]', 'deps = [":a", ":c"]', 1)) == [
      ":b depends on :c but imports none of its srcs"]



def test_every_test_gets_the_conftest_xla_flags():
  problems = env_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)

if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
